"""Python stubs for TorchServe's own gRPC API, generated from the protos in its jar.

TorchServe ships ``inference.proto`` and ``management.proto`` only inside
``ts/frontend/model-server.jar``. They are extracted and compiled with
grpcio-tools into a build folder on first use (never committed); the stubs
need ``googleapis-common-protos`` (``google.rpc.status_pb2``) at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

__all__ = ["jar_path", "load_stubs"]

_PROTOS = ("inference.proto", "management.proto", "google/rpc/status.proto")


def jar_path() -> Path:
    """The TorchServe frontend jar of the installed ``ts`` package."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise RuntimeError("TorchServe (package 'ts') is not installed")
    return Path(spec.origin).parent / "frontend" / "model-server.jar"


def _generate(out: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    src = out / "protos"
    with zipfile.ZipFile(jar_path()) as jar:
        for name in _PROTOS:
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jar.read(name))
    include = Path(protoc.__file__).parent / "_proto"
    for name in ("inference.proto", "management.proto"):
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(src / name),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {name} (exit {code})")


def load_stubs(out: Path) -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc).

    Args:
        out: the build folder for the protos and stubs (created; reused when present).
    """
    out = out.resolve()
    if not (out / "inference_pb2_grpc.py").exists() or not (out / "management_pb2.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        _generate(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    names = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")
    mods = [importlib.import_module(n) for n in names]
    return mods[0], mods[1], mods[2], mods[3]
