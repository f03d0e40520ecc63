"""Build step: the gRPC stubs of protos/camserve/v1/explanation.proto (never committed).

Everything else is in pyproject.toml. ``build_py`` generates the stubs into the
package (into the source tree for editable installs) with grpcio-tools and
mypy-protobuf; without grpcio-tools the build goes on and the package generates
them on first import (see ``camserve/gateway/codegen.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _codegen():  # loaded by path: importing the package would need its dependencies
    spec = importlib.util.spec_from_file_location(
        "_camserve_codegen", HERE / "camserve/gateway/codegen.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        codegen = _codegen()
        editable = getattr(self, "editable_mode", False)
        base = HERE if editable else Path(self.build_lib)
        try:
            codegen.generate(base / "camserve/gateway/_generated", HERE / "protos")
        except ImportError as exc:
            self.warn(f"gRPC stubs not generated at build time ({exc}); generated on first import")
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
