"""Data sets an audit reads: COCO instances JSON, a Pascal VOC folder, or images plus a CSV.

Reading a data set reads only its annotations; images are decoded one at a
time by :func:`load_image`, so a bad image fails alone (the runner lists it
and goes on). Data set categories are matched to the model's labels by name
(case, spaces, hyphens and underscores ignored) or through a mapping file.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from camserve.errors import InvalidImageError, InvalidRequestError

__all__ = [
    "Dataset",
    "Item",
    "Truth",
    "load_image",
    "match_categories",
    "open_dataset",
    "read_mapping",
]


@dataclass(frozen=True)
class Truth:
    """One labelled object: its category and, when known, its box.

    Attributes:
        category: the data set's category name.
        box: ``(x0, y0, x1, y1)`` inclusive pixel coordinates in the image as
            stored, or None for an image-level label.
    """

    category: str
    box: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class Item:
    """One image of a data set.

    Attributes:
        key: a stable id, unique in the data set (the file name relative to its root).
        path: the image file.
        truths: its labelled objects (may be empty).
    """

    key: str
    path: Path
    truths: tuple[Truth, ...]


@dataclass(frozen=True)
class Dataset:
    """A data set's images and annotations, in a stable order.

    Attributes:
        name: where it came from (the path given).
        format: ``coco``, ``voc`` or ``csv``.
        items: the images.
        categories: every category name, in the data set's order.
    """

    name: str
    format: str
    items: tuple[Item, ...]
    categories: tuple[str, ...]


def _coco(path: Path) -> Dataset:
    try:
        data = json.loads(path.read_text())
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        truths: dict[int, list[Truth]] = {int(im["id"]): [] for im in data["images"]}
        for a in data.get("annotations", []):
            x, y, w, h = (float(v) for v in a["bbox"])
            name = cats.get(int(a["category_id"]), str(a["category_id"]))
            box = (x, y, x + w - 1.0, y + h - 1.0) if w > 0 and h > 0 else None
            truths[int(a["image_id"])].append(Truth(name, box))
        items = []
        for im in data["images"]:
            rel = str(im["file_name"])
            p = path.parent / rel
            if not p.exists() and (path.parent / "images" / rel).exists():
                p = path.parent / "images" / rel  # COCO's own layout
            items.append(Item(rel, p, tuple(truths[int(im["id"])])))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{path}: not a COCO instances file ({exc!r})") from exc
    return Dataset(str(path), "coco", tuple(items), tuple(cats.values()))


def _voc(root: Path) -> Dataset:
    items = []
    names: dict[str, None] = {}
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
            fname = tree.findtext("filename") or f"{xml.stem}.jpg"
            truths = []
            for obj in tree.iter("object"):
                name = (obj.findtext("name") or "").strip()
                bb = obj.find("bndbox")
                box = None
                if bb is not None:
                    # VOC boxes are 1-based and inclusive.
                    x0, y0, x1, y1 = (float(bb.findtext(t) or "nan") - 1.0
                                      for t in ("xmin", "ymin", "xmax", "ymax"))
                    box = (x0, y0, x1, y1)
                names[name] = None
                truths.append(Truth(name, box))
        except (ET.ParseError, ValueError) as exc:
            raise InvalidRequestError(f"{xml}: not a Pascal VOC annotation ({exc})") from exc
        items.append(Item(f"JPEGImages/{fname}", root / "JPEGImages" / fname, tuple(truths)))
    return Dataset(str(root), "voc", tuple(items), tuple(names))


_CSV_BOX = ("x0", "y0", "x1", "y1")


def _csv(path: Path) -> Dataset:
    """Rows ``image,label[,x0,y0,x1,y1]`` (header required), one per object or label."""
    order: dict[str, list[Truth]] = {}
    names: dict[str, None] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        if not {"image", "label"} <= fields:
            raise InvalidRequestError(
                f"{path}: a labels CSV needs the columns image,label (and optionally "
                f"x0,y0,x1,y1); got {sorted(fields)}"
            )
        has_box = set(_CSV_BOX) <= fields
        for line, row in enumerate(reader, start=2):
            img = (row["image"] or "").strip()
            label = (row["label"] or "").strip()
            if not img:
                raise InvalidRequestError(f"{path}:{line}: empty image field")
            box = None
            if has_box and all((row[c] or "").strip() for c in _CSV_BOX):
                try:
                    x0, y0, x1, y1 = (float(row[c]) for c in _CSV_BOX)
                except ValueError as exc:
                    raise InvalidRequestError(f"{path}:{line}: bad box ({exc})") from exc
                box = (x0, y0, x1, y1)
            order.setdefault(img, [])
            if label:
                names[label] = None
                order[img].append(Truth(label, box))
    items = tuple(Item(k, path.parent / k, tuple(v)) for k, v in order.items())
    return Dataset(str(path), "csv", items, tuple(names))


def open_dataset(path: str | Path) -> Dataset:
    """Reads a data set's annotations.

    Args:
        path: a COCO instances ``.json`` (images relative to its folder, or to
            its ``images/`` folder); a Pascal VOC folder (``Annotations/*.xml``
            and ``JPEGImages/``); a ``.csv`` of ``image,label[,x0,y0,x1,y1]``
            rows (images relative to its folder); or a folder holding
            ``instances.json`` or ``labels.csv``.

    Raises:
        InvalidRequestError: a path that is none of these, or a malformed file.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "Annotations").is_dir():
            return _voc(p)
        for name in ("instances.json", "labels.csv"):
            if (p / name).is_file():
                return open_dataset(p / name)
        raise InvalidRequestError(
            f"data set {str(path)!r}: a folder needs Annotations/ (VOC), instances.json (COCO) "
            "or labels.csv"
        )
    if p.suffix.lower() == ".json" and p.is_file():
        return _coco(p)
    if p.suffix.lower() == ".csv" and p.is_file():
        return _csv(p)
    raise InvalidRequestError(
        f"data set {str(path)!r}: expected a COCO .json, a labels .csv or a VOC folder"
    )


def load_image(item: Item) -> NDArray[np.uint8]:
    """Decodes an item's image as ``(H, W, 3)`` uint8 RGB.

    Raises:
        InvalidImageError: a missing, unreadable or truncated file.
    """
    try:
        with Image.open(item.path) as pil:
            pil.load()
            return np.array(pil.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"image {item.key!r}: {exc}") from exc


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def read_mapping(path: str | Path) -> dict[str, str]:
    """A mapping file: JSON or YAML object ``{data set category: model label}``."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"mapping file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise InvalidRequestError(
            f"mapping file {str(path)!r} must map category names to label names"
        )
    return dict(data)


def match_categories(
    categories: Sequence[str],
    labels: Sequence[str],
    mapping: Mapping[str, str] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Matches data set categories to the model's class ids.

    A category given in ``mapping`` goes to that label (which must exist);
    the others match a label of the same name, ignoring case, spaces,
    hyphens and underscores (``"Red circle"`` is ``red_circle``).

    Returns:
        ``(category -> class id, unmatched categories)``.

    Raises:
        InvalidRequestError: a mapping onto a label the model does not have.
    """
    by_norm = {_norm(lab): i for i, lab in enumerate(labels)}
    out: dict[str, int] = {}
    unmatched: list[str] = []
    for cat in categories:
        if mapping is not None and cat in mapping:
            target = mapping[cat]
            if _norm(target) not in by_norm:
                raise InvalidRequestError(
                    f"mapping sends category {cat!r} to {target!r}, which is not a model label"
                )
            out[cat] = by_norm[_norm(target)]
        elif _norm(cat) in by_norm:
            out[cat] = by_norm[_norm(cat)]
        else:
            unmatched.append(cat)
    return out, unmatched
