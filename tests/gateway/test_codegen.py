"""Stubs come from the .proto (never committed), with .pyi files, and ship in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from camserve.gateway import codegen

ROOT = Path(__file__).resolve().parents[2]


def test_generate_writes_stubs_with_flat_imports(tmp_path: Path) -> None:
    written = {p.name for p in codegen.generate(tmp_path)}
    assert {
        "explanation_pb2.py", "explanation_pb2_grpc.py", "explanation_pb2.pyi",
        "explanation_pb2_grpc.pyi", "explanation.proto", "__init__.py",
    } <= written  # fmt: skip
    grpc_stub = (tmp_path / "explanation_pb2_grpc.py").read_text()
    assert "from camserve.gateway._generated import explanation_pb2" in grpc_stub
    assert "from camserve.v1 import" not in grpc_stub
    assert "class ExplainRequest" in (tmp_path / "explanation_pb2.pyi").read_text()


def test_stubs_are_not_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "camserve/gateway/_generated"], cwd=ROOT, capture_output=True,
        text=True, check=False,
    ).stdout  # fmt: skip
    assert tracked.strip() == ""


@pytest.mark.slow
def test_the_wheel_carries_the_stubs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file() and not name.startswith("model_store/"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    assert not (src / "camserve/gateway/_generated").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        cwd=src, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("camserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("explanation_pb2.py", "explanation_pb2_grpc.py", "explanation_pb2.pyi",
                 "explanation.proto"):  # fmt: skip
        assert f"camserve/gateway/_generated/{stub}" in names
