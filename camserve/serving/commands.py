"""``camserve serve``, ``camserve stop`` and ``camserve build-models``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from camserve.serving.launcher import REPO_ROOT, ServeConfig, TorchServe, TorchServeError

__all__ = ["register"]


def _store(args: argparse.Namespace) -> Path:
    return Path(args.model_store).resolve()


def _build_models(args: argparse.Namespace) -> int:
    from camserve.torchserve.archive import build_zoo, build_zoo_archives, write_examples

    store = _store(args)
    build_zoo(store, force=args.force)
    for mar in build_zoo_archives(store):
        print(f"[camserve] archived {mar}")
    write_examples(store)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = ServeConfig(
        model_store=_store(args),
        run_dir=Path(args.run_dir).resolve(),
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
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.token_auth:
        print("[camserve] refusing to turn token auth off on a non-loopback address")
        return 2
    server = TorchServe(config)
    print(f"[camserve] starting TorchServe from {config.model_store} in {server.run_dir}")
    try:
        server.start()
        server.wait_ready(timeout=args.timeout)
    except (TorchServeError, KeyboardInterrupt) as exc:
        server.stop()
        print(f"[camserve] TorchServe did not start: {exc}", file=sys.stderr)
        return 1
    print("[camserve] ready:")
    for key, value in server.describe().items():
        print(f"  {key:22s} {value}")
    print(f"  {'models':22s} {', '.join(server.models)}")
    example = next((m for m in server.models if "vqa" not in m and "caption" not in m), None)
    example = example or server.models[0]
    print("[camserve] try (any PNG/JPEG; model_store/examples/ has some):")
    print("  " + server.curl_example(example, _example_image(config.model_store)))
    if args.background:
        print(f"[camserve] in the background; stop: camserve stop --run-dir {args.run_dir}")
        return 0
    print("[camserve] Ctrl-C stops it")
    code = server.serve_forever()
    print("[camserve] stopped")
    return code


def _example_image(store: Path) -> str:
    examples = sorted((store / "examples").glob("*.png"))
    if examples:
        return os.path.relpath(examples[0])
    return "image.png"


def _stop(args: argparse.Namespace) -> int:
    server = TorchServe(ServeConfig(run_dir=Path(args.run_dir).resolve()))
    if server.running_pid() is None:
        print(f"[camserve] no TorchServe runs from {server.run_dir}")
        return 0
    server.stop()
    print("[camserve] stopped")
    return 0


def register(sub: Any) -> None:
    """Adds the serving subcommands to the top-level parser's subparsers."""
    default_store = str(REPO_ROOT / "model_store")
    default_run = str(REPO_ROOT / "var" / "torchserve")

    p = sub.add_parser("build-models", help="train the demo models if missing, archive them")
    p.add_argument("--model-store", default=default_store)
    p.add_argument("--force", action="store_true", help="retrain even if models exist")
    p.set_defaults(func=_build_models)

    p = sub.add_parser("serve", help="start TorchServe with the archived models")
    p.add_argument("--model-store", default=default_store)
    p.add_argument("--run-dir", default=default_run, help="logs, pid and key files")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="inference; +1 management, +2 metrics")
    p.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference; +1 management")
    p.add_argument(
        "--no-token-auth",
        action="store_true",
        help="turn TorchServe's token authorization off (loopback development only)",
    )
    p.add_argument("--models", help="comma-separated model names (default: all archives)")
    p.add_argument("--batch-size", type=int, help="override every model's batchSize")
    p.add_argument("--max-batch-delay", type=int, help="override every model's maxBatchDelay (ms)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for READY")
    p.add_argument("--background", action="store_true", help="return once ready")
    p.set_defaults(func=_serve)

    p = sub.add_parser("stop", help="stop the TorchServe started from a run folder")
    p.add_argument("--run-dir", default=default_run)
    p.set_defaults(func=_stop)
