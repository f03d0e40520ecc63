"""Data set readers (COCO, VOC, CSV), category matching, bad images."""

from __future__ import annotations

from pathlib import Path

import pytest

from camserve.audit.datasets import load_image, match_categories, open_dataset, read_mapping
from camserve.errors import InvalidImageError, InvalidRequestError, UnknownNameError
from camserve.zoo.scenes import CLASS_NAMES


def test_coco_reads_boxes_inclusive_and_keeps_bad_images_listed(scenes_coco: Path) -> None:
    ds = open_dataset(scenes_coco)
    assert ds.format == "coco" and len(ds.items) == 14
    assert set(ds.categories) == set(CLASS_NAMES)
    first = ds.items[0]
    assert first.key == "images/000001.png" and first.truths
    x0, y0, x1, y1 = first.truths[0].box or (0, 0, 0, 0)
    assert x1 > x0 and y1 > y0
    assert load_image(first).shape == (64, 64, 3)
    with pytest.raises(InvalidImageError, match=r"broken\.png"):
        load_image(ds.items[3])
    with pytest.raises(InvalidImageError, match=r"missing\.png"):
        load_image(ds.items[-1])
    # A folder holding instances.json reads the same.
    assert open_dataset(scenes_coco.parent).items == ds.items


def test_voc_boxes_are_zero_based(scenes_voc: Path) -> None:
    ds = open_dataset(scenes_voc)
    assert ds.format == "voc" and len(ds.items) == 6
    t = ds.items[0].truths[0]
    assert t.category[0].isupper()  # "Red Circle": matched by name below
    ids, unmatched = match_categories(ds.categories, CLASS_NAMES)
    assert not unmatched and all(CLASS_NAMES[i] == c.lower().replace(" ", "_")
                                 for c, i in ids.items())


def test_csv_with_mapping_file(scenes_csv: Path, tmp_path: Path) -> None:
    ds = open_dataset(scenes_csv)
    assert ds.format == "csv" and len(ds.items) == 6
    ids, unmatched = match_categories(ds.categories, CLASS_NAMES)
    assert not ids and len(unmatched) == len(ds.categories)
    mapping_file = tmp_path / "map.yaml"
    mapping_file.write_text("".join(f"{c}: {c[5:]}\n" for c in ds.categories))
    ids, unmatched = match_categories(ds.categories, CLASS_NAMES, read_mapping(mapping_file))
    assert not unmatched and ids == {c: CLASS_NAMES.index(c[5:]) for c in ds.categories}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{ds.categories[0]}: purple_hexagon\n")
    with pytest.raises(InvalidRequestError, match="purple_hexagon"):
        match_categories(ds.categories, CLASS_NAMES, read_mapping(bad))


def test_bad_data_set_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="expected a COCO"):
        open_dataset(tmp_path / "nothing.txt")
    with pytest.raises(InvalidRequestError, match="Annotations"):
        open_dataset(tmp_path)
    (tmp_path / "x.csv").write_text("file,class\na.png,b\n")
    with pytest.raises(InvalidRequestError, match="image,label"):
        open_dataset(tmp_path / "x.csv")
    (tmp_path / "y.json").write_text('{"images": [{"id": 1}]}')
    with pytest.raises(InvalidRequestError, match="not a COCO"):
        open_dataset(tmp_path / "y.json")
    assert issubclass(UnknownNameError, InvalidRequestError)
