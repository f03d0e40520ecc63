"""``camserve explain``: explain images on this machine, no server needed (or ask a
gateway with ``--remote HOST:PORT``).

For every image, target and method it writes a figure (the photo, the heat map
over it with a colour bar and the localization box, the target and its score in
the title) and, for the whole run, one JSON file with the predictions, the boxes
and the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camserve.errors import CamserveError

__all__ = ["explain_images", "register"]

RESULTS_FILE = "explanations.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "target"


def _figure(
    pixels: Any, heat: Any, box: tuple[int, int, int, int] | None, title: str, path: Path
) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = pixels.shape[:2]
    fig = Figure(figsize=(9.0, 4.2), layout="constrained")
    photo, over = fig.subplots(1, 2)
    extent = (0, w, h, 0)  # pixel (x, y) covers [x, x + 1] x [y, y + 1], as the box does
    photo.imshow(pixels, extent=extent)
    photo.set_title("image")
    over.imshow(pixels, extent=extent)
    shown = over.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=extent)
    if box is not None:
        x0, y0, x1, y1 = box
        over.add_patch(
            Rectangle((x0, y0), x1 - x0 + 1, y1 - y0 + 1, fill=False, color="white", linewidth=2)
        )
    over.set_title(title)
    for ax in (photo, over):
        ax.set_axis_off()
    fig.colorbar(shown, ax=over, fraction=0.046, label="normalised map")
    fig.savefig(path, dpi=100)


def _title(result: Any, target: Any, method: str) -> str:
    if target.kind == "class":
        prob = next((p.probability for p in result.predictions if p.id == target.id), None)
        score = f"p = {prob:.3f}" if prob is not None else f"{result.score} {target.score:.3f}"
        return f"{method}: {target.label} ({score})"
    return f"{method}: {target.label} ({result.score} {target.score:.3f})"


def explain_images(
    images: Sequence[Path],
    model: str,
    out: Path,
    *,
    methods: Sequence[str] = ("gradcam",),
    top_k: int = 1,
    layer: str | None = None,
    question: str | None = None,
    store: Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    remote: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Explains ``images`` with ``model`` and writes the figures and the JSON into ``out``.

    Args:
        images: PNG/JPEG files.
        model: a spec file, a model name in ``store``, or a built-in model name.
        out: the output folder (created).
        methods: method ids.
        top_k: classes to explain per image (classifiers).
        layer: the layer to explain (default: the model's).
        question: the question (VQA models).
        store: the model store (default: the settings' ``model_store``).
        device: ``cpu``, ``cuda``... (default: the settings' ``device``).
        batch_size: images per engine call.
        progress: show a progress bar on stderr.
        remote: ``host:port`` of a camserve gateway to ask instead of loading the
            model here (``model`` is then a name the gateway serves).
        token: the gateway's bearer token, if it wants one.

    Returns:
        What the JSON file holds: ``{"model", "results": [...]}``, one entry per image.

    Raises:
        CamserveError: an unknown model or a wrong spec (per-image errors go to the JSON).
    """
    from camserve.models import resolve
    from camserve.service import (
        ExplainError,
        ExplainRequest,
        ExplainService,
        Outcome,
        load_settings,
    )
    from camserve.service.images import decode_image

    run: Callable[[list[ExplainRequest]], list[Outcome]]
    close: Callable[[], None] = lambda: None  # noqa: E731
    if remote is not None:
        from camserve.client import Client

        client = Client(remote, token=token, timeout=600)
        name, kind = model, client.describe(model).kind
        run, close = client.explain_batch, client.close
    else:
        settings = load_settings()
        spec = resolve(model, store if store is not None else settings.model_store)
        service = ExplainService.from_specs([spec], device=device, settings=settings)
        name, kind = spec.name, service.describe(spec.name).kind
        run = service.run
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), unit="image", disable=not progress, file=sys.stderr)
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        payloads = [p.read_bytes() for p in chunk]
        requests = []
        for p, data in zip(chunk, payloads, strict=True):
            requests.append(
                ExplainRequest(
                    model=name,
                    image=data,
                    methods=tuple(methods),
                    top_k=top_k if kind == "classifier" else None,
                    layer=layer,
                    question=question,
                    request_id=str(p),
                )
            )
        for path, data, outcome in zip(chunk, payloads, run(requests), strict=True):
            if isinstance(outcome, ExplainError):
                err = outcome.error
                entries.append({"image": str(path), "error": f"{type(err).__name__}: {err}"})
                bar.update(1)
                continue
            pixels = decode_image(data).pixels
            targets = []
            for rank, target in enumerate(outcome.targets):
                maps = {}
                for method, m in target.maps.items():
                    figure = out / f"{path.stem}_{rank}_{_slug(target.label)}_{method}.png"
                    _figure(pixels, m.data, m.box, _title(outcome, target, method), figure)
                    maps[method] = {"box": list(m.box) if m.box else None, "figure": figure.name}
                targets.append(
                    {
                        "kind": target.kind,
                        "label": target.label,
                        "id": target.id,
                        "score": target.score,
                        "maps": maps,
                    }
                )
            entries.append(
                {
                    "image": str(path),
                    "image_size": list(outcome.image_size),
                    "layer": outcome.layer,
                    "score": outcome.score,
                    "predictions": [
                        {"id": p.id, "label": p.label, "probability": p.probability}
                        for p in outcome.predictions
                    ],
                    "caption": outcome.caption,
                    "answer": outcome.answer,
                    "targets": targets,
                    "timings": dict(outcome.timings),
                }
            )
            bar.update(1)
    bar.close()
    close()
    report = {"model": name, "methods": list(methods), "results": entries}
    (out / RESULTS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _explain(args: argparse.Namespace) -> int:
    try:
        report = explain_images(
            [Path(p) for p in args.images],
            args.model,
            Path(args.out),
            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
            top_k=args.top_k,
            layer=args.layer,
            question=args.question,
            store=Path(args.model_store) if args.model_store else None,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.quiet,
            remote=args.remote,
            token=args.token or os.environ.get("CAMSERVE_GATEWAY_TOKEN") or None,
        )
    except CamserveError as exc:
        print(f"[camserve] {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in report["results"] if "error" in r]
    for r in failed:
        print(f"[camserve] {r['image']}: {r['error']}", file=sys.stderr)
    print(f"[camserve] wrote {Path(args.out) / RESULTS_FILE}")
    return 1 if failed else 0


def register(sub: Any) -> None:
    """Adds ``explain`` to the top-level parser's subparsers."""
    p = sub.add_parser("explain", help="explain images locally: figures and a JSON, no server")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--model", required=True, help="a spec file, a model store name or built-in")
    p.add_argument("--methods", default="gradcam", help="comma-separated method ids")
    p.add_argument("--top-k", type=int, default=1, help="classes to explain per image")
    p.add_argument("--layer", help="the layer to explain (default: the model's)")
    p.add_argument("--question", help="the question (VQA models)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-store", help="the model store (default ./model_store)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the settings' device)")
    p.add_argument("--batch-size", type=int, default=8, help="images per engine call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="ask a camserve gateway instead of loading the model here",
    )
    p.add_argument("--token", help="the gateway's bearer token (default $CAMSERVE_GATEWAY_TOKEN)")
    p.set_defaults(func=_explain)
