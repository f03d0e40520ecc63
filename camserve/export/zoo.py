"""ONNX files for the demo zoo: ``export_zoo(store)`` writes ``<store>/<name>.onnx``.

Every example input is real: held-out scenes from the store's datasets (and,
for VQA, their questions). The captioner stays on the torch engine (see
:data:`TORCH_ONLY`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from camserve.errors import InvalidRequestError
from camserve.export.exporter import ExportReport, export_onnx
from camserve.models import read_spec, write_spec
from camserve.zoo.store import ModelEntry, load, read_manifest
from camserve.zoo.text import Vocab

__all__ = [
    "QUESTION_LENGTH",
    "TORCH_ONLY",
    "export_zoo",
    "export_zoo_specs",
    "load_images",
    "zoo_example",
]

QUESTION_LENGTH = 16
"""Question tokens per image in the exported VQA graph (right-padded with ``<pad>``)."""

TORCH_ONLY: dict[str, str] = {
    "captioner": (
        "its explanations follow the caption it generates: greedy decoding stops at a "
        "data-dependent length, and each word's score needs the tokens decoded before it, "
        "so the graph cannot have one fixed set of inputs; served by the torch engine"
    ),
}
"""Zoo architectures that are not exported, and why."""


def load_images(
    files: list[Path], size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """Images as the model input: RGB, bilinear to ``size`` (H, W), ``(pixels/255 - mean)/std``.

    Returns:
        float32 ``(N, 3, H, W)``.
    """
    if not files:
        raise InvalidRequestError("no example images")
    rows = []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            rows.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return ((x - m) / s).contiguous()


def zoo_example(store: str | Path, entry: ModelEntry, n: int = 4) -> tuple[Tensor, ...]:
    """``n`` real held-out inputs of a zoo model (images, and question tokens for VQA)."""
    root = Path(store)
    split = "multi_test" if entry.kind == "vqa" else "single_test"
    folder = root / "datasets" / split
    images = json.loads((folder / "instances.json").read_text())["images"][:n]
    x = load_images(
        [folder / im["file_name"] for im in images],
        (entry.input_size[1], entry.input_size[2]),
        entry.mean,
        entry.std,
    )
    if entry.kind != "vqa":
        return (x,)
    questions = json.loads((folder / "questions.json").read_text())["questions"]
    by_image = {q["image_id"]: q["question"] for q in reversed(questions)}
    vocab = Vocab(entry.vocab)
    texts = [by_image[im["id"]] for im in images]
    return x, vocab.encode_batch(texts, length=QUESTION_LENGTH)


def export_zoo(
    store: str | Path,
    names: list[str] | None = None,
    *,
    out: str | Path | None = None,
    targets: int = 5,
) -> dict[str, ExportReport | str]:
    """Export the store's models to ``<out>/<name>.onnx``.

    Args:
        store: the model store (with ``manifest.json`` and its datasets).
        names: the models to export (default: all of the manifest).
        out: the folder to write to (default: ``store``).
        targets: top-k of the export check (the graphs take any k where they can).

    Returns:
        name -> the export report, or the reason it stays on the torch engine.

    Raises:
        UnknownNameError: a name not in the manifest.
        ExportError: a model that should export and does not.
    """
    _, entries = read_manifest(store)
    folder = Path(out if out is not None else store)
    reports: dict[str, ExportReport | str] = {}
    for name in names or list(entries):
        model, entry = load(store, name)
        if entry.arch in TORCH_ONLY:
            reports[name] = TORCH_ONLY[entry.arch]
            continue
        meta = {
            "camserve.model": name,
            "camserve.kind": entry.kind,
            "camserve.labels": json.dumps(list(entry.labels)),
            "camserve.mean": json.dumps(list(entry.mean)),
            "camserve.std": json.dumps(list(entry.std)),
        }
        if entry.kind == "vqa":
            meta["camserve.pad_id"] = "0"
        reports[name] = export_onnx(
            model,
            zoo_example(store, entry),
            entry.target_layer,
            folder / f"{name}.onnx",
            targets=targets,
            metadata=meta,
        )
    return reports


def export_zoo_specs(store: str | Path) -> dict[str, Path]:
    """Exports the store's classifiers and writes a spec with ``runtime = "onnx"`` for each.

    ``<store>/<name>.onnx`` and ``<store>/<name>_onnx.toml`` (the model's spec,
    named ``<name>_onnx``, with the ONNX file): ``camserve serve --model
    <name>_onnx`` or ``ExplainService.from_specs`` serves it with onnxruntime
    at its layer and the torch engine for the other methods and layers.

    Returns:
        model name -> the spec file written.

    Raises:
        ExportError: a model that should export and does not.
        SpecError: the store's spec of a model is wrong.
    """
    root = Path(store)
    _, entries = read_manifest(root)
    names = [n for n, e in entries.items() if e.kind == "classifier" and e.arch not in TORCH_ONLY]
    written: dict[str, Path] = {}
    for name, report in export_zoo(root, names).items():
        if not isinstance(report, ExportReport):
            continue
        spec = read_spec(root / f"{name}.toml")
        onnx_spec = replace(spec, name=f"{name}_onnx", runtime="onnx", onnx=report.path)
        written[name] = write_spec(onnx_spec, root / f"{name}_onnx.toml")
    return written
