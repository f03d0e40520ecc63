"""Builds the TorchServe archives (``.mar``) of the zoo's models.

Each archive holds the handler for the model's kind, the model's state dict and
the zoo's manifest (as extra files); the handler loads the model through
:func:`camserve.zoo.load`, so no model code is pickled or copied into archives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from camserve.torchserve import resources

__all__ = [
    "ARCHIVE_INFO",
    "HANDLERS",
    "HANDLER_BASE",
    "build_archives",
    "build_zoo",
    "write_examples",
    "zoo_models",
]

ARCHIVE_INFO = "camserve.json"
"""Extra file of every archive: the zoo model it serves and its kind."""

HANDLER_BASE = resources.handler_base_file()
"""The handlers' shared class, shipped as an extra file of every archive."""
HANDLERS = {kind: resources.handler_file(kind) for kind in resources.HANDLER_FILES}


def build_zoo(store: Path, force: bool = False) -> None:
    """Generates the data and trains every demo model into ``store`` (minutes).

    Unless ``force``, a store whose manifest matches the zoo's build settings is kept.
    """
    store.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "camserve.zoo.build", "--out", str(store)]
    # Run from the folder this camserve is imported from, so `-m` finds the same one.
    here = Path(__file__).resolve().parents[2]
    subprocess.run(cmd if force else [*cmd, "--if-missing"], check=True, cwd=here)


def zoo_models(store: Path) -> dict[str, dict[str, Any]]:
    """Model name -> {"kind", "files"} from the zoo's manifest in ``store``."""
    manifest = json.loads((store / "manifest.json").read_text())
    entries = manifest["models"]
    if isinstance(entries, list):
        entries = {e["name"]: e for e in entries}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        kind = entry.get("kind")
        if kind not in HANDLERS:
            raise ValueError(f"model {name!r}: unknown kind {kind!r}")
        out[name] = {"kind": kind, "files": [store / entry["state_dict"]]}
    return out


def build_archives(store: Path, names: list[str] | None = None) -> list[Path]:
    """Archives the zoo's models in ``store`` as ``store/<name>.mar``; returns the paths."""
    models = zoo_models(store)
    paths = []
    for name, info in models.items():
        if names is not None and name not in names:
            continue
        extra = [str(p) for p in info["files"]] + [str(HANDLER_BASE)]
        with tempfile.TemporaryDirectory() as tmp:
            # The archive must hold the manifest under its own name beside the state dict.
            manifest = Path(tmp) / "manifest.json"
            manifest.write_text((store / "manifest.json").read_text())
            extra.append(str(manifest))
            # Which zoo model this archive serves, whatever name it is registered under.
            own = Path(tmp) / ARCHIVE_INFO
            own.write_text(json.dumps({"zoo_name": name, "kind": info["kind"]}))
            extra.append(str(own))
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from model_archiver.model_packaging import generate_model_archive as g; g()",
                    "--model-name",
                    name,
                    "--version",
                    "1.0",
                    "--handler",
                    str(HANDLERS[info["kind"]]),
                    "--extra-files",
                    ",".join(extra),
                    "--export-path",
                    str(store),
                    "--force",
                ],
                check=True,
                cwd=tmp,
            )
        paths.append(store / f"{name}.mar")
    return paths


def write_examples(store: Path, count: int = 4, seed: int = 2024) -> list[Path]:
    """Writes a few synthetic scenes as ``store/examples/scene_<i>.png`` (for curl examples)."""
    import io

    import numpy as np
    from PIL import Image

    from camserve.zoo.scenes import generate_scene

    out = store / "examples"
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
