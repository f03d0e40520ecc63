"""``camserve export-onnx MODEL_OR_SPEC --layer L --out FILE``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from camserve.errors import CamserveError, InvalidRequestError

__all__ = ["register"]


def _from_zoo(name: str, store: Path, n: int) -> tuple[nn.Module, str, tuple[Tensor, ...]] | None:
    from camserve.export.zoo import TORCH_ONLY, zoo_example
    from camserve.zoo.store import load, read_manifest

    if not (store / "manifest.json").is_file():
        return None
    _, entries = read_manifest(store)
    if name not in entries:
        return None
    entry = entries[name]
    if entry.arch in TORCH_ONLY:
        raise InvalidRequestError(f"{name} is not exported: {TORCH_ONLY[entry.arch]}")
    model, entry = load(store, name)
    return model, entry.target_layer, zoo_example(store, entry, n)


def _from_spec(arg: str, store: Path, images: list[Path]) -> tuple[nn.Module, str, Tensor]:
    """A model spec (file, store name or built-in) through :mod:`camserve.models`."""
    from camserve.export.zoo import load_images

    models = importlib.import_module("camserve.models")
    resolve: Any = getattr(models, "resolve", None)
    load_model: Any = getattr(models, "load_model", None)
    if resolve is None or load_model is None:
        raise InvalidRequestError(
            f"{arg!r} is not a model of {store / 'manifest.json'}, and this camserve has no "
            "model spec loader"
        )
    spec = resolve(arg, store)
    if spec.kind != "classifier":
        raise InvalidRequestError(f"export-onnx takes classifier specs, {arg!r} is a {spec.kind}")
    if not images:
        raise InvalidRequestError(
            "a model spec needs real example images: --images FILE [FILE ...]"
        )
    loaded = load_model(spec)
    size = (int(spec.input_size[1]), int(spec.input_size[2]))
    return loaded.model, str(spec.layer), load_images(images, size, spec.mean, spec.std)


def _export(args: argparse.Namespace) -> int:
    from camserve.export.exporter import export_onnx

    store = Path(args.model_store)
    images = [Path(p) for p in args.images or []]
    try:
        found = _from_zoo(args.model, store, args.examples) if not images else None
        if found is not None:
            model, layer, example = found[0], found[1], tuple(found[2])
        else:
            model, layer, x = _from_spec(args.model, store, images)
            example = (x,)
        report = export_onnx(
            model,
            example,
            args.layer or layer,
            Path(args.out),
            targets=args.targets,
            tolerance=args.tolerance,
        )
    except CamserveError as exc:
        print(f"[camserve] export failed: {exc}", file=sys.stderr)
        return 1
    print(f"[camserve] {report.summary()}")
    return 0


def register(sub: Any) -> None:
    """Add the ``export-onnx`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "export-onnx",
        help="export a model with its layer's activations and target gradients to ONNX",
        description=(
            "Export a model to ONNX with the outputs logits, activations, gradients (of the "
            "target scores w.r.t. the layer) and, for a GAP + linear head, cam; check it "
            "with onnx.checker and compare onnxruntime with torch on real inputs."
        ),
    )
    p.add_argument("model", metavar="MODEL_OR_SPEC", help="a zoo model name or a model spec")
    p.add_argument("--layer", default=None, help="module path of the layer (default: the model's)")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--model-store", default="model_store", help="the model store folder")
    p.add_argument("--images", nargs="*", default=None, help="real example images (PNG/JPEG)")
    p.add_argument("--examples", type=int, default=4, help="zoo examples to check with")
    p.add_argument("--targets", type=int, default=5, help="top-k of the check")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="accepted max abs difference, relative to max(1, max |torch|)",
    )
    p.set_defaults(func=_export)
