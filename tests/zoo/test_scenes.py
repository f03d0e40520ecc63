"""Synthetic scenes: ground truth matches the pixels, and the seed fixes every byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.zoo.coco import decode_rle, encode_rle, read_dataset, write_dataset
from camserve.zoo.scenes import (
    CLASS_NAMES,
    COLOUR_RGB,
    COLOURS,
    COUNT_WORDS,
    generate_scenes,
)

SATURATED = 62  # max - min channel: objects are above, background and clutter below


def _colour_of(pixels: np.ndarray) -> list[str]:
    protos = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)
    d = ((pixels[:, None, :].astype(np.float32) - protos[None]) ** 2).sum(-1)
    return [COLOURS[i] for i in d.argmin(1)]


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_masks_and_boxes_match_the_pixels(kind: str) -> None:
    for scene in generate_scenes(seed=3, count=60, kind=kind):
        img = scene.image.astype(np.int16)
        saturated = (img.max(-1) - img.min(-1)) > SATURATED
        union = np.zeros(saturated.shape, dtype=bool)
        for obj in scene.objects:
            assert not (union & obj.mask).any(), "objects overlap"
            union |= obj.mask
            ys, xs = np.nonzero(obj.mask)
            x, y, w, h = obj.bbox
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                    ys.max() - ys.min() + 1)
            assert set(_colour_of(scene.image[obj.mask])) == {obj.colour}
        # every saturated pixel belongs to an object and every object pixel is saturated
        assert np.array_equal(saturated, union)


def test_shapes_have_their_geometry() -> None:
    for scene in generate_scenes(seed=5, count=80, kind="single"):
        (obj,) = scene.objects
        _, _, w, h = obj.bbox
        fill = obj.mask.sum() / (w * h)
        expected = {"square": (0.97, 1.0), "circle": (0.70, 0.86), "triangle": (0.42, 0.62)}
        lo, hi = expected[obj.shape]
        assert lo <= fill <= hi, (obj.shape, fill)


def test_captions_and_answers_follow_the_objects() -> None:
    for scene in generate_scenes(seed=7, count=80, kind="multi"):
        xs = [o.centre[0] for o in scene.objects]
        assert xs == sorted(xs)
        assert scene.caption == " left of ".join(f"a {o.colour} {o.shape}"
                                                 for o in scene.objects)
        for qa in scene.questions:
            words = qa.question.rstrip("?").split()
            if qa.question == "how many objects are there?":
                assert qa.answer == COUNT_WORDS[len(scene.objects)]
            elif qa.kind == "count" and words[2] in COLOURS:
                n = sum(o.colour == words[2] for o in scene.objects)
                assert qa.answer == COUNT_WORDS[n]
            elif qa.kind == "count":
                n = sum(o.shape + "s" == words[2] for o in scene.objects)
                assert qa.answer == COUNT_WORDS[n]
            elif qa.kind == "colour":
                (match,) = [o for o in scene.objects if o.shape == words[-1]]
                assert qa.answer == match.colour
            elif qa.kind == "shape":
                (match,) = [o for o in scene.objects if o.colour == words[4]]
                assert qa.answer == match.shape
            else:
                present = any(o.colour == words[3] and o.shape == words[4]
                              for o in scene.objects)
                assert qa.answer == ("yes" if present else "no")


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = generate_scenes(seed=11, count=12, kind="multi")
    b = generate_scenes(seed=11, count=12, kind="multi")
    c = generate_scenes(seed=12, count=12, kind="multi")
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.questions for s in a] == [s.questions for s in b]
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]


def test_all_classes_appear_and_labels_are_known() -> None:
    labels = {s.label for s in generate_scenes(seed=0, count=300)}
    assert labels == set(CLASS_NAMES)


def test_bad_arguments_raise_named_errors() -> None:
    with pytest.raises(UnknownNameError, match="valid scene kinds: multi, single"):
        generate_scenes(seed=0, count=1, kind="many")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="count"):
        generate_scenes(seed=0, count=-1)


def test_coco_round_trip(tmp_path: Path) -> None:
    scenes = generate_scenes(seed=13, count=9, kind="multi")
    write_dataset(scenes, tmp_path)
    inst = json.loads((tmp_path / "instances.json").read_text())
    assert {"images", "annotations", "categories"} <= set(inst)
    assert len(inst["categories"]) == len(CLASS_NAMES)
    records = read_dataset(tmp_path)
    assert len(records) == len(scenes)
    for rec, scene in zip(records, scenes, strict=True):
        assert np.array_equal(rec.image, scene.image)  # PNG is lossless
        assert [a.category for a in rec.annotations] == [o.label for o in scene.objects]
        for ann, obj in zip(rec.annotations, scene.objects, strict=True):
            assert ann.bbox == tuple(float(v) for v in obj.bbox)
            assert np.array_equal(ann.mask, obj.mask)
        assert rec.captions == (scene.caption,)
        assert rec.questions == scene.questions


def test_rle_forms_and_polygons(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((13, 17)) < 0.4
        mask[0, 0] = bool(rng.integers(2))  # runs that start with a set pixel
        assert np.array_equal(decode_rle(encode_rle(mask)), mask)
        assert np.array_equal(decode_rle(encode_rle(mask, compressed=True)), mask)
    # the COCO API's string for a 4x4 mask with columns 1 and 3 set: counts
    # [4, 4, 4, 4]; from the fourth count on it stores the difference to the
    # count two back (4 - 4 = 0 -> '0'), each 5-bit group offset by 48
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, 1] = mask[:, 3] = True
    assert encode_rle(mask, compressed=True)["counts"] == "4440"
    with pytest.raises(InvalidRequestError, match="RLE counts"):
        decode_rle({"size": [2, 2], "counts": [1, 1]})
    # real COCO files carry polygons for single instances
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.png", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [2, 2, 5, 5],
                         "segmentation": [[2, 2, 7, 2, 7, 7, 2, 7]]}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    (rec,) = read_dataset(tmp_path)
    (ann,) = rec.annotations
    assert ann.category == "thing" and rec.captions == ()
    ys, xs = np.nonzero(ann.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 7, 2, 7)
