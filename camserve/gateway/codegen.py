"""Generates the Python stubs of ``camserve/v1/explanation.proto`` (never committed).

The stubs (``explanation_pb2``, ``explanation_pb2_grpc``) and their typing stubs
(``.pyi``, from mypy-protobuf) are written flat into the package folder
``camserve/gateway/_generated/``, with a copy of the ``.proto`` for clients in
other languages. The build runs this (``setup.py``'s ``build_py``, editable
installs included); a source checkout without a build generates on first import
(:func:`ensure`), and again when the ``.proto`` is newer than the stubs.
``python -m camserve.gateway.codegen`` regenerates by hand.

This module uses the standard library only (the build loads it by path);
grpcio-tools is imported when generating.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["GENERATED", "PROTO", "ensure", "generate", "proto_source"]

PROTO = "camserve/v1/explanation.proto"
"""The proto's path under its include root (the name it is registered under)."""
GENERATED = Path(__file__).resolve().parent / "_generated"
"""Where the stubs live: ``camserve/gateway/_generated/`` (git-ignored)."""
_STUBS = ("explanation_pb2.py", "explanation_pb2_grpc.py")
_PYI = ("explanation_pb2.pyi", "explanation_pb2_grpc.pyi")
_ORIGINAL_IMPORT = "from camserve.v1 import explanation_pb2"
_FLAT_IMPORT = "from camserve.gateway._generated import explanation_pb2"


def proto_source() -> Path | None:
    """The include root holding :data:`PROTO`: the repository's ``protos/``, or None."""
    root = Path(__file__).resolve().parents[2] / "protos"
    return root if (root / PROTO).is_file() else None


def _plugin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def generate(out: Path = GENERATED, root: Path | None = None) -> list[Path]:
    """Compiles the proto into ``out`` (stubs, ``.pyi`` where mypy-protobuf is installed).

    Files are generated in a temporary folder and moved in one by one with
    :func:`os.replace`, so a concurrent importer never sees half a file.

    Args:
        out: the target folder (created).
        root: the include root holding :data:`PROTO` (default: :func:`proto_source`).

    Returns:
        The files written.

    Raises:
        FileNotFoundError: no ``.proto`` to compile.
        RuntimeError: protoc failed.
    """
    root = root if root is not None else proto_source()
    if root is None:
        raise FileNotFoundError(f"{PROTO} not found: the stubs cannot be generated")
    from grpc_tools import protoc  # type: ignore[import-untyped]

    include = Path(protoc.__file__).parent / "_proto"
    googleapis = _googleapis_root()
    with tempfile.TemporaryDirectory(prefix="camserve-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            *([f"-I{googleapis}"] if googleapis else []),
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
        if mypy and mypy_grpc:
            args += [
                f"--plugin=protoc-gen-mypy={mypy}",
                f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
            ]
        code = protoc.main([*args, str(root / PROTO)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
        src = Path(tmp) / Path(PROTO).parent
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        staged = Path(tmp) / "staged"
        staged.mkdir()
        (staged / "__init__.py").write_text('"""Generated gRPC stubs (not committed)."""\n')
        (staged / "explanation.proto").write_bytes((root / PROTO).read_bytes())
        for name in (*_PYI, *_STUBS):  # stubs last: their presence means "generated"
            if (src / name).exists():
                text = (src / name).read_text().replace(_ORIGINAL_IMPORT, _FLAT_IMPORT)
                (staged / name).write_text(text)
        for f in sorted(staged.iterdir(), key=lambda p: p.name in _STUBS):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    return written


def _googleapis_root() -> Path | None:
    """The folder holding ``google/rpc/status.proto`` (googleapis-common-protos)."""
    try:
        import google.rpc as rpc
    except ImportError:
        return None
    for folder in rpc.__path__:
        if (Path(folder) / "status.proto").exists():
            return Path(folder).parents[1]
    return None


def ensure(out: Path = GENERATED) -> None:
    """Generates the stubs when they are missing, or older than the repository's ``.proto``."""
    stubs = [out / n for n in _STUBS]
    root = proto_source()
    if all(s.exists() for s in stubs):
        if root is None:
            return
        newest = (root / PROTO).stat().st_mtime
        if all(s.stat().st_mtime >= newest for s in stubs):
            return
    generate(out, root)


def main() -> int:
    """``python -m camserve.gateway.codegen``: regenerate the stubs."""
    for path in generate():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
