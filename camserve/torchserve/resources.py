"""Files TorchServe needs from camserve: the handler modules, the config template and
the metrics YAML.

They are package data of :mod:`camserve.torchserve` (``files/handlers/*.py`` and
``files/torchserve/``), found with :mod:`importlib.resources` wherever camserve is
installed. In a source checkout ``files/handlers`` and ``files/torchserve`` are
links to ``handlers/`` and ``deploy/torchserve/``; a wheel carries copies.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["HANDLER_FILES", "config_template", "handler_base_file", "handler_file", "metrics_yaml"]

HANDLER_FILES = {
    "classifier": "classifier_handler.py",
    "captioner": "caption_handler.py",
    "vqa": "vqa_handler.py",
}
"""Model kind -> the handler module TorchServe loads for it."""


def _file(*parts: str) -> Path:
    """A package data file of ``camserve.torchserve`` as a real path.

    Raises:
        FileNotFoundError: camserve is installed without its package data (or
            from a zip, which TorchServe cannot read archive sources from).
    """
    resource = files(__package__ or "camserve.torchserve").joinpath("files", *parts)
    path = Path(str(resource))
    if not isinstance(resource, Path) or not path.is_file():
        raise FileNotFoundError(
            f"camserve's package data {'/'.join(parts)!r} is missing (looked for {path}); "
            "reinstall camserve from its wheel"
        )
    return path


def handler_file(kind: str) -> Path:
    """The handler module of a model kind (``classifier``, ``captioner``, ``vqa``).

    Raises:
        KeyError: an unknown kind.
        FileNotFoundError: the package data is missing.
    """
    return _file("handlers", HANDLER_FILES[kind])


def handler_base_file() -> Path:
    """The handlers' shared class, shipped as an extra file of every archive."""
    return _file("handlers", "camserve_base.py")


def config_template() -> Path:
    """TorchServe's ``config.properties`` template."""
    return _file("torchserve", "config.properties")


def metrics_yaml() -> Path:
    """TorchServe's metrics YAML (declares camserve's custom metrics)."""
    return _file("torchserve", "metrics.yaml")
