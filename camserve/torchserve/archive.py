"""Builds TorchServe archives (``.mar``) from model specs.

An archive holds the handler for the model's kind, the handlers' shared class
(``camserve_base.py``) and the spec's bundle (:func:`camserve.models.bundle`:
``model.toml`` plus the files it references, by basename); the handler loads the
model from the bundle through :func:`camserve.models.load_model`, so no model
code is pickled into archives. Handler files are located only through
:mod:`camserve.torchserve.resources`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from camserve.models import ModelSpec, bundle, read_spec
from camserve.torchserve.resources import handler_base_file, handler_file

__all__ = [
    "build_archive",
    "build_zoo",
    "build_zoo_archives",
    "write_examples",
    "zoo_models",
    "zoo_specs",
]


def build_archive(spec: ModelSpec, store: str | Path) -> Path:
    """Archives ``spec``'s model as ``<store>/<spec.name>.mar``; returns its path.

    Raises:
        SpecError: a file the spec references is missing.
        subprocess.CalledProcessError: the model archiver failed.
    """
    out = Path(store).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"
        bundle(spec, folder)
        extra = [str(p) for p in sorted(folder.iterdir())] + [str(handler_base_file())]
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from model_archiver.model_packaging import generate_model_archive as g; g()",
                "--model-name",
                spec.name,
                "--version",
                "1.0",
                "--handler",
                str(handler_file(spec.kind)),
                "--extra-files",
                ",".join(extra),
                "--export-path",
                str(out),
                "--force",
            ],
            check=True,
            cwd=tmp,
        )
    return out / f"{spec.name}.mar"


def zoo_specs(store: str | Path) -> dict[str, ModelSpec]:
    """The specs the zoo wrote into ``store`` (``<name>.toml`` of every manifest entry)."""
    from camserve.zoo.store import read_manifest

    _, entries = read_manifest(store)
    return {name: read_spec(Path(store) / f"{name}.toml") for name in entries}


def zoo_models(store: str | Path) -> dict[str, dict[str, Any]]:
    """Model name -> ``{"kind", "files"}`` (the files an archive bundles) of the zoo's specs."""
    return {
        name: {"kind": spec.kind, "files": [p for p in (spec.weights, spec.program) if p]}
        for name, spec in zoo_specs(store).items()
    }


def build_zoo(store: str | Path, force: bool = False) -> None:
    """Generates the data and trains every demo model into ``store`` (minutes), writes specs.

    Unless ``force``, a store whose manifest matches the zoo's build settings is kept.
    """
    from camserve.zoo.store import write_specs

    folder = Path(store)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "camserve.zoo.build", "--out", str(folder)]
    package_parent = Path(__file__).resolve().parents[2]  # run this camserve, not another
    subprocess.run(cmd if force else [*cmd, "--if-missing"], check=True, cwd=package_parent)
    write_specs(folder)


def build_zoo_archives(store: str | Path, names: list[str] | None = None) -> list[Path]:
    """Archives the zoo's models in ``store`` from their specs; returns the ``.mar`` paths."""
    return [
        build_archive(spec, store)
        for name, spec in zoo_specs(store).items()
        if names is None or name in names
    ]


def write_examples(store: str | Path, count: int = 4, seed: int = 2024) -> list[Path]:
    """Writes a few synthetic scenes as ``store/examples/scene_<i>.png`` (for curl examples)."""
    import io

    import numpy as np
    from PIL import Image

    from camserve.zoo.scenes import generate_scene

    out = Path(store) / "examples"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        scene = generate_scene(rng, 64, 1 + i % 3)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG")
        path = out / f"scene_{i}.png"
        path.write_bytes(buf.getvalue())
        (out / f"scene_{i}.txt").write_text(scene.caption + "\n")
        paths.append(path)
    return paths
