"""``camserve serve``, ``camserve stop`` and ``camserve build-models``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError
from camserve.torchserve.config import ServeConfig, TorchServeError
from camserve.torchserve.process import TorchServe, stop_signals

__all__ = ["register"]


def _folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model store and TorchServe's run folder: the options, else the settings.

    TorchServe's run folder is ``torchserve/`` in the settings' run folder.

    Raises:
        CamserveError: a settings file or ``CAMSERVE_*`` variable is wrong.
    """
    from camserve.service.settings import load_settings

    store, run = getattr(args, "model_store", None), getattr(args, "run_dir", None)
    if store is None or run is None:
        settings = load_settings()
        store = store or settings.model_store
        run = run or settings.run_dir / "torchserve"
    return Path(store).resolve(), Path(run).resolve()


def _build_models(args: argparse.Namespace) -> int:
    from camserve.torchserve.archive import build_zoo, build_zoo_archives, write_examples

    store, _ = _folders(args)
    build_zoo(store, force=args.force)
    for mar in build_zoo_archives(store):
        print(f"[camserve] archived {mar}")
    write_examples(store)
    if args.onnx:
        from camserve.export.zoo import export_zoo_specs

        for name, spec in export_zoo_specs(store).items():
            print(f"[camserve] exported {store / (name + '.onnx')}, spec {spec}")
    return 0


def _config(args: argparse.Namespace) -> ServeConfig:
    store, run = _folders(args)
    return ServeConfig(
        model_store=store,
        run_dir=run,
        host=args.host,
        inference_port=args.port,
        management_port=args.port + 1,
        metrics_port=args.port + 2,
        grpc_inference_port=args.grpc_port,
        grpc_management_port=args.grpc_port + 1,
        token_auth=not args.no_token_auth and os.environ.get("CAMSERVE_TOKEN_AUTH", "1") != "0",
        models=args.models.split(",") if args.models else None,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
    )


def _archive_specs(names: list[str], store: Path) -> list[str]:
    """Resolves, checks (the model is built and loaded once) and archives each ``--model``.

    Returns:
        The model names, in order.

    Raises:
        CamserveError: a spec that cannot be found or is wrong (the message names
            the field and the value).
    """
    from camserve.models import load_model, resolve
    from camserve.torchserve.archive import build_archive

    served = []
    for name in names:
        spec = resolve(name, store)
        load_model(spec)
        print(f"[camserve] archived {build_archive(spec, store)}")
        served.append(spec.name)
    return served


def _serve(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.token_auth:
        print("[camserve] refusing to turn token auth off on a non-loopback address")
        return 2
    if args.model:
        extra = _archive_specs(args.model, config.model_store)
        if config.models is not None:
            models = list(dict.fromkeys([*config.models, *extra]))
            config = dataclasses.replace(config, models=models)
    server = TorchServe(config)
    if args.print_config:
        try:
            print(server.render(), end="")
        except TorchServeError as exc:
            print(f"[camserve] {exc}", file=sys.stderr)
            return 1
        return 0
    print(f"[camserve] starting TorchServe from {server.config.model_store} in {server.run_dir}")
    try:
        with stop_signals():
            server.start()
            server.wait_ready(timeout=args.timeout)
    except (TorchServeError, KeyboardInterrupt) as exc:
        server.stop()
        print(f"[camserve] TorchServe did not start: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    try:
        with stop_signals():
            _print_ready(server)
    except KeyboardInterrupt:
        server.stop()
        print("[camserve] stopped")
        return 0
    if args.background:
        print(f"[camserve] in the background; stop: camserve stop --run-dir {server.run_dir}")
        return 0
    code = server.serve_forever(ready=lambda: print("[camserve] Ctrl-C stops it", flush=True))
    print("[camserve] stopped")
    return code


def _print_ready(server: TorchServe) -> None:
    print("[camserve] ready:")
    for key, value in server.describe().items():
        print(f"  {key:22s} {value}")
    print(f"  {'models':22s} {', '.join(server.models)}")
    example = _example_model(server.models, server.config.model_store)
    print("[camserve] try (any PNG/JPEG; model_store/examples/ has some):")
    print("  " + server.curl_example(example, _example_image(server.config.model_store)))


def _example_model(models: list[str], store: Path) -> str:
    """A served zoo classifier (the example images are zoo scenes), else the first model."""
    from camserve.torchserve.archive import zoo_models

    try:
        zoo = zoo_models(store)
    except (OSError, ValueError, KeyError):
        zoo = {}
    classifiers = [m for m in models if zoo.get(m, {}).get("kind") == "classifier"]
    return classifiers[0] if classifiers else models[0]


def _example_image(store: Path) -> str:
    examples = sorted((store / "examples").glob("*.png"))
    if examples:
        return os.path.relpath(examples[0])
    return "image.png"


def _stop(args: argparse.Namespace) -> int:
    _, run = _folders(args)
    server = TorchServe(ServeConfig(run_dir=run))
    if server.running_pid() is None:
        print(f"[camserve] no TorchServe runs from {server.run_dir}")
        return 0
    server.stop()
    print("[camserve] stopped")
    return 0


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Runs ``command``; a wrong setting, spec or model name prints its message, exit code 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CamserveError as exc:
            print(f"[camserve] {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub: Any) -> None:
    """Adds the serving subcommands to the top-level parser's subparsers."""
    store_help = "default: the model_store setting (./model_store)"
    run_help = "logs, pid and key files; default: torchserve/ in the run_dir setting (./var)"

    p = sub.add_parser("build-models", help="train the demo models if missing, archive them")
    p.add_argument("--model-store", help=store_help)
    p.add_argument("--force", action="store_true", help="retrain even if models exist")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export the classifiers to <name>.onnx with <name>_onnx.toml specs "
        "(runtime onnx; about 1-2 minutes on 2 cores)",
    )
    p.set_defaults(func=_user_errors(_build_models))

    p = sub.add_parser("serve", help="start TorchServe with the archived models")
    p.add_argument("--model-store", help=store_help)
    p.add_argument("--run-dir", help=run_help)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="inference; +1 management, +2 metrics")
    p.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference; +1 management")
    p.add_argument(
        "--no-token-auth",
        action="store_true",
        help="turn TorchServe's token authorization off (loopback development only)",
    )
    p.add_argument(
        "--models", help="comma-separated archive names in the store (default: all archives)"
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="SPEC",
        help="a model spec file (TOML/YAML), a name with a spec in the store, or a built-in "
        "(efficientnet_lite0): checked, archived into the store and served beside the "
        "--models archives (repeatable; alone: --models <its name> --model SPEC)",
    )
    p.add_argument("--batch-size", type=int, help="override every model's batchSize")
    p.add_argument("--max-batch-delay", type=int, help="override every model's maxBatchDelay (ms)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for READY")
    p.add_argument("--background", action="store_true", help="return once ready")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the config.properties this would run with, start nothing",
    )
    p.set_defaults(func=_user_errors(_serve))

    p = sub.add_parser("stop", help="stop the TorchServe started from a run folder")
    p.add_argument("--run-dir", help=run_help)
    p.set_defaults(func=_user_errors(_stop))
