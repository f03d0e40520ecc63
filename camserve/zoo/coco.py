"""Data sets on disk in the formats real tools read: PNG files plus COCO-style JSON.

A data set directory holds:

- ``images/<id>.png``;
- ``instances.json``: COCO detection format (``images``, ``annotations`` with
  ``bbox`` ``[x, y, w, h]``, ``area``, ``iscrowd`` and an uncompressed RLE
  ``segmentation``, ``categories`` with ``colour`` and ``shape`` attributes);
- ``captions.json``: COCO captions format (``annotations`` of ``{image_id, caption}``);
- ``questions.json``: VQA format (``questions`` of ``{image_id, question,
  question_id}`` and ``annotations`` with ``multiple_choice_answer``).

:func:`read_dataset` reads the same layout back, and also real-world COCO
files (polygon and compressed RLE segmentations; captions or questions may be
missing), which is how the audit mode reads its data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from camserve.errors import InvalidRequestError
from camserve.zoo.scenes import CLASS_NAMES, QuestionAnswer, Scene

__all__ = [
    "Annotation",
    "DatasetRecord",
    "decode_rle",
    "encode_rle",
    "read_dataset",
    "write_dataset",
]


@dataclass(frozen=True)
class Annotation:
    """One object instance: category name, COCO box ``(x, y, w, h)`` and mask."""

    category: str
    bbox: tuple[float, float, float, float]
    mask: NDArray[np.bool_]


@dataclass(frozen=True)
class DatasetRecord:
    """One image of a data set read back from disk."""

    image_id: int
    file_name: str
    image: NDArray[np.uint8]
    annotations: tuple[Annotation, ...]
    captions: tuple[str, ...] = ()
    questions: tuple[QuestionAnswer, ...] = field(default=())


def encode_rle(mask: NDArray[np.bool_], compressed: bool = False) -> dict[str, Any]:
    """COCO RLE of a mask: run lengths in column-major order, starting with zeros.

    Uncompressed (``counts`` a list) by default; ``compressed=True`` gives the
    COCO API's string form.
    """
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = [int(c) for c in np.diff(bounds)]
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    size = [int(mask.shape[0]), int(mask.shape[1])]
    if compressed:
        return {"size": size, "counts": _encode_counts_string(counts)}
    return {"size": size, "counts": counts}


def _encode_counts_string(counts: Sequence[int]) -> str:
    """The COCO API's compressed RLE string (maskApi ``rleToString``)."""
    out: list[str] = []
    for i, cnt in enumerate(counts):
        x = cnt - counts[i - 2] if i > 2 else cnt
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _decode_counts_string(s: str) -> list[int]:
    """Decodes the compressed RLE string of the COCO API (6-bit groups, delta from 2 back)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict[str, Any]) -> NDArray[np.bool_]:
    """Mask (H, W) from an uncompressed (list) or compressed (string) COCO RLE."""
    h, w = (int(v) for v in rle["size"])
    raw = rle["counts"]
    counts = _decode_counts_string(raw) if isinstance(raw, str) else [int(c) for c in raw]
    if sum(counts) != h * w:
        raise InvalidRequestError(f"RLE counts sum to {sum(counts)}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F").astype(np.bool_)


def _polygons_to_mask(polys: Sequence[Sequence[float]], h: int, w: int) -> NDArray[np.bool_]:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=np.uint8).astype(np.bool_)


def _categories() -> list[dict[str, Any]]:
    return [
        {"id": i + 1, "name": name, "supercategory": name.split("_")[1],
         "colour": name.split("_")[0], "shape": name.split("_")[1]}
        for i, name in enumerate(CLASS_NAMES)
    ]


def write_dataset(scenes: Sequence[Scene], out_dir: str | Path, name: str = "scenes") -> Path:
    """Writes ``scenes`` as PNG images and the three JSON files; returns ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cat_id = {c["name"]: c["id"] for c in _categories()}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    caps: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    for i, scene in enumerate(scenes, start=1):
        fname = f"images/{i:06d}.png"
        Image.fromarray(scene.image, mode="RGB").save(out / fname, optimize=False)
        h, w = scene.image.shape[:2]
        images.append({"id": i, "file_name": fname, "width": w, "height": h})
        for obj in scene.objects:
            anns.append({
                "id": len(anns) + 1, "image_id": i, "category_id": cat_id[obj.label],
                "bbox": [float(v) for v in obj.bbox], "area": float(obj.mask.sum()),
                "iscrowd": 0, "segmentation": encode_rle(obj.mask),
            })
        caps.append({"id": len(caps) + 1, "image_id": i, "caption": scene.caption})
        for qa in scene.questions:
            qid = len(questions) + 1
            questions.append({"question_id": qid, "image_id": i, "question": qa.question})
            answers.append({
                "question_id": qid, "image_id": i, "question_type": qa.kind,
                "answer_type": "number" if qa.kind == "count" else
                               "yes/no" if qa.kind == "exists" else "other",
                "multiple_choice_answer": qa.answer,
                "answers": [{"answer": qa.answer, "answer_confidence": "yes", "answer_id": 1}],
            })
    info = {"description": f"camserve synthetic scenes: {name}", "version": "1.0"}
    files = {
        "instances.json": {"info": info, "images": images, "annotations": anns,
                           "categories": _categories()},
        "captions.json": {"info": info, "images": images, "annotations": caps},
        "questions.json": {"info": info, "questions": questions, "annotations": answers},
    }
    for fname, payload in files.items():
        (out / fname).write_text(json.dumps(payload, separators=(",", ":")))
    return out


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{path}: expected a JSON object at the top level")
    return data


def read_dataset(root: str | Path, instances: str = "instances.json") -> list[DatasetRecord]:
    """Reads a data set written by :func:`write_dataset`, or real COCO annotations.

    Args:
        root: directory holding the JSON files; image ``file_name`` is relative to it
            (or to ``root/images`` when not found directly, as in COCO's layout).
        instances: the detection annotation file name (e.g. ``instances_val2017.json``).
    """
    base = Path(root)
    inst = _load_json(base / instances)
    if inst is None:
        raise InvalidRequestError(f"no {instances} in {base}")
    cats = {int(c["id"]): str(c["name"]) for c in inst.get("categories", [])}
    by_image: dict[int, list[Annotation]] = {int(im["id"]): [] for im in inst["images"]}
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in inst["images"]}
    for a in inst.get("annotations", []):
        h, w = sizes[int(a["image_id"])]
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            mask = decode_rle(seg)
        elif isinstance(seg, list):
            mask = _polygons_to_mask(seg, h, w)
        else:
            mask = np.zeros((h, w), dtype=np.bool_)
        bbox = tuple(float(v) for v in a["bbox"])
        by_image[int(a["image_id"])].append(
            Annotation(cats.get(int(a["category_id"]), str(a["category_id"])),
                       (bbox[0], bbox[1], bbox[2], bbox[3]), mask))
    captions: dict[int, list[str]] = {}
    cap = _load_json(base / "captions.json")
    for c in (cap or {}).get("annotations", []):
        captions.setdefault(int(c["image_id"]), []).append(str(c["caption"]))
    qas: dict[int, list[QuestionAnswer]] = {}
    qdata = _load_json(base / "questions.json")
    if qdata is not None:
        answer_of = {int(a["question_id"]): a for a in qdata.get("annotations", [])}
        for q in qdata.get("questions", []):
            a = answer_of.get(int(q["question_id"]))
            if a is not None:
                qas.setdefault(int(q["image_id"]), []).append(QuestionAnswer(
                    str(q["question"]), str(a["multiple_choice_answer"]),
                    str(a.get("question_type", ""))))
    records = []
    for im in inst["images"]:
        iid = int(im["id"])
        path = base / str(im["file_name"])
        if not path.exists():
            path = base / "images" / str(im["file_name"])
        with Image.open(path) as pil:
            pixels = np.array(pil.convert("RGB"), dtype=np.uint8)  # writable copy
        records.append(DatasetRecord(iid, str(im["file_name"]), pixels, tuple(by_image[iid]),
                                     tuple(captions.get(iid, [])), tuple(qas.get(iid, []))))
    return records
