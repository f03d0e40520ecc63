"""``camserve gateway``: serve the gRPC API from the in-process service or from TorchServe."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError

__all__ = ["DEFAULT_MODELS", "build_backend", "register"]

DEFAULT_MODELS = ("resnet_gap", "vgg_fc", "captioner", "vqa", "efficientnet_lite0")
"""What ``camserve gateway`` serves in-process by default: the zoo and EfficientNet-Lite0
(each one that can be loaded; the others are named on the console)."""


def _settings(args: argparse.Namespace) -> Any:
    import yaml
    from pydantic import ValidationError

    from camserve.gateway.settings import GatewaySettings

    values: dict[str, Any] = {}
    if args.config:
        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for name in (
        "host", "port", "metrics_port", "backend", "torchserve_address",
        "torchserve_management_address", "torchserve_key_file", "max_batch_size",
        "max_batch_delay_ms", "max_queue_size", "grace_s", "tls_cert", "tls_key", "tls_client_ca",
    ):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.no_metrics:
        values["metrics_port"] = None
    try:
        return GatewaySettings(**values)
    except ValidationError as exc:
        raise SystemExit(f"[camserve] bad gateway settings: {exc}") from exc


def _loadable(models: list[str], store: Path) -> list[str]:
    """The default models that can be loaded here (each one that cannot is named)."""
    from camserve.models import resolve

    found = []
    for name in models:
        try:
            resolve(name, store)
        except (CamserveError, ImportError) as exc:
            print(f"[camserve] not serving {name}: {exc}", file=sys.stderr)
            continue
        found.append(name)
    return found


def build_backend(
    settings: Any, models: list[str] | None, store: Path, registry: Any = None
) -> Any:
    """The backend the settings ask for.

    Args:
        settings: the gateway's settings.
        models: model names or spec files (in-process backend); None: the
            :data:`DEFAULT_MODELS` that can be loaded.
        store: the model store.
        registry: the Prometheus registry the service's stage metrics go to.

    Raises:
        CamserveError: a model that cannot be loaded (an unknown name, a wrong spec).
    """
    if settings.backend == "torchserve":
        from camserve.gateway.torchserve_backend import TorchServeBackend

        return TorchServeBackend.from_settings(settings, store)
    from camserve.gateway.inprocess import InProcessBackend

    names = models if models is not None else _loadable(list(DEFAULT_MODELS), store)
    return InProcessBackend.load(names, store, registry=registry)


def _gateway(args: argparse.Namespace) -> int:
    from camserve.gateway.server import Gateway, serve

    logging.basicConfig(level=logging.INFO, format="[camserve] %(message)s")
    settings = _settings(args)
    import prometheus_client as prom

    registry = prom.CollectorRegistry()
    try:
        backend = build_backend(settings, args.model or None, Path(args.model_store), registry)
    except CamserveError as exc:
        print(f"[camserve] cannot load the models: {exc}", file=sys.stderr)
        return 2

    def ready(gateway: Gateway) -> None:
        host = settings.host
        print(f"[camserve] gateway listening on {host}:{gateway.port} ({settings.backend} backend)")
        if gateway.metrics_port is not None:
            print(f"[camserve] metrics on http://{host}:{gateway.metrics_port}/metrics")
        try:
            names = backend.model_names()
        except CamserveError as exc:
            names = []
            print(f"[camserve] the backend does not answer yet: {exc}")
        if names:
            print(f"[camserve] models: {', '.join(names)}")
        example = "resnet_gap" if "resnet_gap" in names else (names[0] if names else "MODEL")
        image = Path(args.model_store) / "examples" / "scene_0.png"
        token = " --token $CAMSERVE_GATEWAY_TOKEN" if settings.token else ""
        print("[camserve] try (writes figures and explanations.json into var/explained-remote/):")
        print(
            f"  {sys.executable} -m camserve.cli explain {image} --model {example} "
            f"--remote {host}:{gateway.port}{token} --top-k 2 --out var/explained-remote"
        )
        print("[camserve] Ctrl-C stops it")
        sys.stdout.flush()

    serve(backend, settings, ready, registry)
    print("[camserve] gateway stopped")
    return 0


def register(sub: Any) -> None:
    """Adds ``gateway`` to the ``camserve`` command line."""
    p = sub.add_parser(
        "gateway",
        help="serve camserve's gRPC API (in-process models, or TorchServe behind it)",
        description="Serve camserve.v1.ExplanationService with health, reflection and metrics. "
        "Settings come from --config (YAML), CAMSERVE_GATEWAY_* variables and these flags.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="model name or spec file to serve in-process (repeatable; default: "
        + ", ".join(DEFAULT_MODELS)
        + ")",
    )
    p.add_argument("--model-store", default="model_store")
    p.add_argument("--config", help="YAML file of gateway settings")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0: a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9095)")
    p.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    p.add_argument("--backend", choices=("inprocess", "torchserve"))
    p.add_argument("--torchserve-address", help="TorchServe's gRPC inference API (host:port)")
    p.add_argument(
        "--torchserve-management-address", help="TorchServe's gRPC management API (host:port)"
    )
    p.add_argument("--torchserve-key-file", help="TorchServe's key_file.json (token auth)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-batch-delay-ms", type=float)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--grace-s", type=float)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    p.set_defaults(func=_gateway)
