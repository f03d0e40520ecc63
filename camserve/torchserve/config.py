"""TorchServe's ``config.properties`` for one run: what to serve, where to listen.

:func:`render_config` is a pure function of a :class:`ServeConfig`, the template's
text and the archives in the model store: it reads no file and starts nothing.
:class:`~camserve.torchserve.process.TorchServe` writes its result into the run
folder.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camserve.torchserve import resources

__all__ = [
    "MODEL_DEFAULTS",
    "ServeConfig",
    "TorchServeError",
    "free_port",
    "model_settings",
    "parse_properties",
    "read_properties",
    "render_config",
]

MODEL_DEFAULTS: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 10,
    "responseTimeout": 120,
}
"""TorchServe settings of a model that the template's ``models`` does not list."""

_PORTS = (
    "inference_port",
    "management_port",
    "metrics_port",
    "grpc_inference_port",
    "grpc_management_port",
)


class TorchServeError(RuntimeError):
    """TorchServe cannot be configured, did not start, did not get ready, or did not stop."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_properties(text: str) -> dict[str, str]:
    """Java properties text as a dict (``key=value`` lines; ``#`` comments)."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file as a dict (see :func:`parse_properties`)."""
    return parse_properties(path.read_text())


@dataclass(frozen=True)
class ServeConfig:
    """Where TorchServe listens, what it serves and where it writes.

    Relative paths are relative to the current working directory (never to where
    camserve is installed); :meth:`resolved` makes them absolute.

    Attributes:
        model_store: folder of ``.mar`` archives.
        run_dir: the run folder (config copy, logs, pid and key files; created).
        host: the address every endpoint binds to (loopback by default).
        inference_port, management_port, metrics_port, grpc_inference_port,
        grpc_management_port: the ports.
        token_auth: TorchServe's token authorization (on by default; turn it off
            only on loopback, for development).
        models: the model names to load (default: every archive in the store).
        registrations: instead of ``models``, model name -> TorchServe settings
            with ``marName`` (one archive may be registered under several names).
        batch_size, max_batch_delay_ms: override every model's batching.
        template: the ``config.properties`` template (default: camserve's own).
        metrics_yaml: the metrics YAML declaring the custom metrics (default: camserve's own).
        extra: further properties, written last.
    """

    model_store: Path = Path("model_store")
    run_dir: Path = Path("var/torchserve")
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    models: Sequence[str] | None = None
    registrations: Mapping[str, Mapping[str, Any]] | None = None
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    template: Path = field(default_factory=resources.config_template)
    metrics_yaml: Path = field(default_factory=resources.metrics_yaml)
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def free_ports(cls, **kwargs: Any) -> ServeConfig:
        """A config on five free loopback ports (tests, side-by-side runs)."""
        ports = {name: free_port() for name in _PORTS}
        return cls(**{**ports, **kwargs})

    def resolved(self) -> ServeConfig:
        """The same config with absolute paths (against the current working directory)."""
        return dataclasses.replace(
            self,
            model_store=self.model_store.resolve(),
            run_dir=self.run_dir.resolve(),
            template=self.template.resolve(),
            metrics_yaml=self.metrics_yaml.resolve(),
        )


def model_settings(
    config: ServeConfig, archives: Collection[str], template_models: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Model name -> its TorchServe settings (``marName``, workers, batching...).

    Args:
        config: what to serve.
        archives: the ``.mar`` file names in the model store.
        template_models: the template's ``models`` (name -> version -> settings).

    Raises:
        TorchServeError: a wanted model has no archive, or the store has none.
    """
    available = sorted(a.removesuffix(".mar") for a in archives if a.endswith(".mar"))
    if config.registrations is not None:
        wanted = list(config.registrations)
        for reg in config.registrations.values():
            if str(reg["marName"]) not in archives:
                raise TorchServeError(f"no archive {reg['marName']} in {config.model_store}")
    else:
        wanted = list(config.models) if config.models is not None else available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise TorchServeError(
                f"no archive for model(s) {missing} in {config.model_store}; "
                f"available: {available or 'none (run `camserve build-models`)'}"
            )
    if not wanted:
        raise TorchServeError(
            f"no .mar archives in {config.model_store}: run `camserve build-models` first"
        )
    models: dict[str, dict[str, Any]] = {}
    for name in wanted:
        entry = {**MODEL_DEFAULTS, **template_models.get(name, {}).get("1.0", {})}
        entry.update({"defaultVersion": True, "marName": f"{name}.mar"})
        if config.registrations is not None:
            entry.update(config.registrations[name])
        if config.batch_size is not None:
            entry["batchSize"] = config.batch_size
        if config.max_batch_delay_ms is not None:
            entry["maxBatchDelay"] = config.max_batch_delay_ms
        models[name] = entry
    return models


def render_config(config: ServeConfig, template: str, archives: Collection[str]) -> str:
    """The run's ``config.properties``: the template with this run's values.

    Addresses, ports, ``model_store``, ``metrics_config``, ``load_models``,
    ``models`` (with the batching settings) and token authorization are replaced;
    every other key of the template is kept as written. Paths are written as
    given: pass ``config.resolved()`` for a file TorchServe reads from another folder.

    Args:
        config: what to serve and where.
        template: the template's text (Java properties).
        archives: the ``.mar`` file names in the model store.

    Raises:
        TorchServeError: a wanted model has no archive, or the store has none.
    """
    props = parse_properties(template)
    models = model_settings(config, archives, json.loads(props.get("models") or "{}"))
    host = config.host
    props.update(
        {
            "inference_address": f"http://{host}:{config.inference_port}",
            "management_address": f"http://{host}:{config.management_port}",
            "metrics_address": f"http://{host}:{config.metrics_port}",
            "grpc_inference_address": host,
            "grpc_inference_port": str(config.grpc_inference_port),
            "grpc_management_address": host,
            "grpc_management_port": str(config.grpc_management_port),
            "model_store": str(config.model_store),
            "metrics_config": str(config.metrics_yaml),
            "load_models": ",".join(f"{m}={s['marName']}" for m, s in models.items()),
            "models": json.dumps(
                {m: {"1.0": s} for m, s in models.items()}, separators=(",", ":")
            ),
            "disable_token_authorization": "false" if config.token_auth else "true",
            **config.extra,
        }
    )
    lines = ["# Written by camserve from its config.properties template"]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"
