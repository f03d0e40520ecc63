"""Files TorchServe needs from camserve: the handler modules, the config template and
the metrics YAML."""

from __future__ import annotations

from pathlib import Path

__all__ = ["HANDLER_FILES", "config_template", "handler_base_file", "handler_file", "metrics_yaml"]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_HANDLERS = _REPO_ROOT / "handlers"
_DEPLOY = _REPO_ROOT / "deploy" / "torchserve"

HANDLER_FILES = {
    "classifier": "classifier_handler.py",
    "captioner": "caption_handler.py",
    "vqa": "vqa_handler.py",
}
"""Model kind -> the handler module TorchServe loads for it."""


def handler_file(kind: str) -> Path:
    """The handler module of a model kind (``classifier``, ``captioner``, ``vqa``).

    Raises:
        KeyError: an unknown kind.
    """
    return _HANDLERS / HANDLER_FILES[kind]


def handler_base_file() -> Path:
    """The handlers' shared class, shipped as an extra file of every archive."""
    return _HANDLERS / "camserve_base.py"


def config_template() -> Path:
    """TorchServe's ``config.properties`` template."""
    return _DEPLOY / "config.properties"


def metrics_yaml() -> Path:
    """TorchServe's metrics YAML (declares camserve's custom metrics)."""
    return _DEPLOY / "metrics.yaml"
