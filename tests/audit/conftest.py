"""Fixtures of the audit tests: the built zoo and small data sets written in every format."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from camserve.audit.scorer import InProcessScorer, load_zoo_scorer
from camserve.zoo.coco import write_dataset
from camserve.zoo.scenes import generate_scenes
from tests.zoo.conftest import zoo_store

__all__ = ["zoo_store"]


@pytest.fixture(scope="session")
def resnet(zoo_store: Path) -> InProcessScorer:
    """The zoo's GAP classifier (layer2 is its last spatial layer)."""
    return load_zoo_scorer(zoo_store, "resnet_gap")


@pytest.fixture(scope="session")
def vgg(zoo_store: Path) -> InProcessScorer:
    """The zoo's classifier with a fully connected head."""
    return load_zoo_scorer(zoo_store, "vgg_fc")


@pytest.fixture(scope="session")
def scenes_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 seeded multi-object scenes in COCO format, plus one corrupt and one missing image."""
    out = tmp_path_factory.mktemp("coco")
    write_dataset(generate_scenes(seed=123, count=12, kind="multi"), out)
    import json

    inst = json.loads((out / "instances.json").read_text())
    (out / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    inst["images"].insert(3, {"id": 1001, "file_name": "images/broken.png", "width": 64,
                              "height": 64})
    inst["images"].append({"id": 1002, "file_name": "images/missing.png", "width": 64,
                           "height": 64})
    (out / "instances.json").write_text(json.dumps(inst))
    return out / "instances.json"


@pytest.fixture(scope="session")
def scenes_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 seeded scenes as a Pascal VOC folder (1-based boxes), names capitalised.

    The images are PNG (VOC's <filename> names any file): the zoo's models read
    JPEG artefacts as other shapes, which is not what these tests look at.
    """
    root = tmp_path_factory.mktemp("voc")
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    for i, sc in enumerate(generate_scenes(seed=7, count=6, kind="single")):
        name = f"{i:04d}.png"
        Image.fromarray(sc.image).save(root / "JPEGImages" / name)
        objs = "".join(
            f"<object><name>{o.label.replace('_', ' ').title()}</name><bndbox>"
            f"<xmin>{o.bbox[0] + 1}</xmin><ymin>{o.bbox[1] + 1}</ymin>"
            f"<xmax>{o.bbox[0] + o.bbox[2]}</xmax><ymax>{o.bbox[1] + o.bbox[3]}</ymax>"
            "</bndbox></object>"
            for o in sc.objects
        )
        (root / "Annotations" / f"{i:04d}.xml").write_text(
            f"<annotation><filename>{name}</filename>{objs}</annotation>")
    return root


@pytest.fixture(scope="session")
def scenes_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 seeded scenes as PNGs at 96 px (resized on load) plus a CSV with coded labels."""
    root = tmp_path_factory.mktemp("csv")
    rows = []
    for i, sc in enumerate(generate_scenes(seed=9, count=6, kind="single")):
        name = f"img_{i}.png"
        Image.fromarray(sc.image).resize((96, 96), Image.Resampling.NEAREST).save(root / name)
        for o in sc.objects:
            x, y, w, h = o.bbox
            rows.append({"image": name, "label": f"code-{o.label}",
                         "x0": x * 1.5, "y0": y * 1.5, "x1": (x + w) * 1.5 - 1,
                         "y1": (y + h) * 1.5 - 1})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "x0", "y0", "x1", "y1"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def photos_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos: scikit-learn's two sample images and matplotlib's Grace Hopper, each also
    mirrored (6 images, no labels), as an image folder with a labels CSV."""
    skd = pytest.importorskip("sklearn.datasets")
    import matplotlib

    sources = [Path(skd.__file__).parent / "images" / n for n in ("china.jpg", "flower.jpg")]
    sources.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for src in sources:
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        for name, img in ((src.stem, rgb),
                          (f"{src.stem}_mirrored", rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            img.save(root / f"{name}.png")
            rows.append({"image": f"{name}.png", "label": ""})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"
