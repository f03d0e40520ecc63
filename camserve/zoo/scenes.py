"""Seeded synthetic scenes whose ground truth is known to the pixel.

Each scene is an RGB image (64 px by default) holding 1-3 flat-coloured shapes
(circle, square, triangle x red, green, blue, yellow) on a noisy, textured,
nearly grey background with grey clutter (thin lines and dots) as distractors.
For every object the generator keeps its exact mask (the pixels it painted)
and its tight box, so explanations can be checked against the truth: the
pointing game and weak localization of 003 sec. 3, the VQA and captioning
explanations of 001 sec. 2.2-2.3.

Background and clutter are kept low in saturation (max - min channel below
about 60), objects high (above 90), so the objects' pixels are exactly those
of saturated colour: tests recover every mask from the pixels alone.

Example:
    >>> scenes = generate_scenes(seed=0, count=4, kind="multi")
    >>> scenes[0].image.shape, scenes[0].caption  # doctest: +SKIP
    ((64, 64, 3), 'a red circle left of a blue square')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "COLOUR_RGB",
    "COUNT_WORDS",
    "SHAPES",
    "QuestionAnswer",
    "Scene",
    "SceneKind",
    "SceneObject",
    "caption_for",
    "class_name",
    "generate_scene",
    "generate_scenes",
    "questions_for",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 55),
    "blue": (45, 75, 225),
    "yellow": (225, 205, 35),
}
#: Classifier labels: every colour x shape pair, ``"<colour>_<shape>"``.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

SceneKind = Literal["single", "multi"]
_MIN_SIZE, _MAX_SIZE = 12, 22  # object extent in px at 64 px, scaled with the image size
_COLOUR_JITTER = 18  # per-object, per-channel shift of the nominal colour
_OBJECT_NOISE = 4.0  # per-pixel std on objects


def class_name(colour: str, shape: str) -> str:
    """The classifier label of a colour and a shape, e.g. ``"red_circle"``."""
    if colour not in COLOURS:
        raise UnknownNameError("colour", colour, COLOURS)
    if shape not in SHAPES:
        raise UnknownNameError("shape", shape, SHAPES)
    return f"{colour}_{shape}"


@dataclass(frozen=True)
class SceneObject:
    """One painted shape: its category, tight box and exact mask.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        bbox: COCO box ``(x, y, width, height)`` in pixels, tight around ``mask``.
        mask: bool (H, W), the pixels painted with the object's colour.
    """

    shape: str
    colour: str
    bbox: tuple[int, int, int, int]
    mask: NDArray[np.bool_]

    @property
    def label(self) -> str:
        """The classifier label, ``"<colour>_<shape>"``."""
        return f"{self.colour}_{self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the box."""
        x, y, w, h = self.bbox
        return x + (w - 1) / 2.0, y + (h - 1) / 2.0

    def contains(self, x: int, y: int) -> bool:
        """Whether pixel ``(x, y)`` lies in the box (the pointing game's hit test, 003 sec. 3)."""
        bx, by, bw, bh = self.bbox
        return bx <= x < bx + bw and by <= y < by + bh


@dataclass(frozen=True)
class QuestionAnswer:
    """A VQA pair (001 sec. 2.3); ``kind`` is colour, shape, count or exists."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """An image with its objects (ordered left to right), caption and questions."""

    image: NDArray[np.uint8]
    objects: tuple[SceneObject, ...]
    caption: str
    questions: tuple[QuestionAnswer, ...]

    @property
    def label(self) -> str:
        """Label of the main (largest) object: the classifier's target."""
        main = max(self.objects, key=lambda o: int(o.mask.sum()))
        return main.label


def caption_for(objects: tuple[SceneObject, ...]) -> str:
    """The scene's caption: objects left to right, e.g. "a red circle left of a blue square"."""
    parts = [f"a {o.colour} {o.shape}" for o in sorted(objects, key=lambda o: o.centre[0])]
    return " left of ".join(parts)


def questions_for(
    objects: tuple[SceneObject, ...], rng: np.random.Generator
) -> tuple[QuestionAnswer, ...]:
    """Question/answer pairs with one well-defined answer each (001 sec. 2.3 style).

    Templates: "what colour is the <shape>?" (when that shape is unique), "what shape
    is the <colour> object?" (when that colour is unique), "how many <colour>
    objects / <shape>s / objects are there?" (answers zero..three) and "is there a
    <colour> <shape>?" (one present and one absent pair, so yes and no balance).
    """
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    qa: list[QuestionAnswer] = []
    for o in objects:
        if shapes.count(o.shape) == 1:
            qa.append(QuestionAnswer(f"what colour is the {o.shape}?", o.colour, "colour"))
        if colours.count(o.colour) == 1:
            qa.append(QuestionAnswer(f"what shape is the {o.colour} object?", o.shape, "shape"))
    c = COLOURS[int(rng.integers(len(COLOURS)))]
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    qa.append(QuestionAnswer(f"how many {c} objects are there?", COUNT_WORDS[colours.count(c)],
                             "count"))
    qa.append(QuestionAnswer(f"how many {s}s are there?", COUNT_WORDS[shapes.count(s)], "count"))
    qa.append(QuestionAnswer("how many objects are there?", COUNT_WORDS[len(objects)], "count"))
    present = objects[int(rng.integers(len(objects)))]
    qa.append(QuestionAnswer(f"is there a {present.colour} {present.shape}?", "yes", "exists"))
    absent = [(c2, s2) for c2 in COLOURS for s2 in SHAPES
              if not any(o.colour == c2 and o.shape == s2 for o in objects)]
    c2, s2 = absent[int(rng.integers(len(absent)))]
    qa.append(QuestionAnswer(f"is there a {c2} {s2}?", "no", "exists"))
    return tuple(qa)


def _background(rng: np.random.Generator, size: int) -> NDArray[np.float32]:
    """Grey-ish textured noise: a tinted base, a sinusoid or checker texture, luminance noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(70.0, 185.0)
    tint = rng.uniform(-10.0, 10.0, size=3)
    if rng.random() < 0.5:
        f = rng.uniform(1.0, 6.0, size=2) * (2.0 * np.pi / size)
        texture = rng.uniform(5.0, 20.0) * np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 2 * np.pi))
    else:
        cell = int(rng.integers(4, 12))
        texture = rng.uniform(4.0, 14.0) * (((xx // cell + yy // cell) % 2) * 2.0 - 1.0)
    lum = rng.normal(0.0, rng.uniform(3.0, 10.0), size=(size, size)).astype(np.float32)
    chroma = rng.normal(0.0, 2.5, size=(size, size, 3)).astype(np.float32)
    img: NDArray[np.float32] = (base + tint[None, None, :] + (texture + lum)[:, :, None]
                                + chroma).astype(np.float32)
    return img


def _clutter(img: NDArray[np.float32], rng: np.random.Generator) -> None:
    """Paints 0-4 grey distractors (thin lines and small dots) in place."""
    size = img.shape[0]
    for _ in range(int(rng.integers(0, 5))):
        grey = float(rng.choice([rng.uniform(10.0, 60.0), rng.uniform(200.0, 250.0)]))
        if rng.random() < 0.5:  # a thin straight line
            x0, y0, x1, y1 = rng.uniform(0, size - 1, size=4)
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            xs = np.linspace(x0, x1, n).round().astype(int)
            ys = np.linspace(y0, y1, n).round().astype(int)
            img[ys, xs, :] = grey
        else:  # a small square dot
            d = int(rng.integers(2, 4))
            x, y = rng.integers(0, size - d, size=2)
            img[y:y + d, x:x + d, :] = grey


def _shape_mask(shape: str, cx: float, cy: float, extent: float, size: int) -> NDArray[np.bool_]:
    """Exact mask of a shape of the given extent centred at ``(cx, cy)`` (pixel centres)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    half = extent / 2.0
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= half * half
    elif shape == "square":
        mask = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    elif shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        top, bottom = cy - half, cy + half
        t = (yy - top) / max(bottom - top, 1e-6)  # 0 at the apex, 1 at the base
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * half)
    else:
        raise UnknownNameError("shape", shape, SHAPES)
    return np.asarray(mask, dtype=np.bool_)


def _tight_box(mask: NDArray[np.bool_]) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def _place(
    rng: np.random.Generator, n: int, size: int
) -> list[tuple[float, float, float]] | None:
    """Centres and extents of ``n`` shapes whose boxes keep a gap and distinct x order."""
    scale = size / 64.0
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for _attempt in range(60):
            ext = float(rng.integers(_MIN_SIZE, _MAX_SIZE + 1)) * scale
            lo, hi = ext / 2.0 + 1.0, size - 2.0 - ext / 2.0
            cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
            ok = all(
                (abs(cx - px) > (ext + pe) / 2.0 + 3.0 or abs(cy - py) > (ext + pe) / 2.0 + 3.0)
                and abs(cx - px) >= 4.0 * scale
                for px, py, pe in placed
            )
            if ok:
                placed.append((cx, cy, ext))
                break
        else:
            return None
    return placed


def generate_scene(
    rng: np.random.Generator, size: int = 64, n_objects: int = 1
) -> Scene:
    """One scene with ``n_objects`` (1-3) shapes; all randomness comes from ``rng``.

    Args:
        rng: the generator; the same state gives the same scene, byte for byte.
        size: image side in pixels (>= 32).
        n_objects: number of shapes, 1 to 3.
    """
    if not 1 <= n_objects <= 3:
        raise InvalidRequestError(f"n_objects must be 1, 2 or 3, got {n_objects}")
    if size < 32:
        raise InvalidRequestError(f"size must be >= 32 px, got {size}")
    img = _background(rng, size)
    _clutter(img, rng)
    placed = _place(rng, n_objects, size)
    while placed is None:
        placed = _place(rng, n_objects, size)
    objects: list[SceneObject] = []
    for cx, cy, ext in placed:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        mask = _shape_mask(shape, cx, cy, ext, size)
        rgb = np.asarray(COLOUR_RGB[colour], np.float32)
        rgb = rgb + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3).astype(np.float32)
        noise = rng.normal(0.0, _OBJECT_NOISE, size=(int(mask.sum()), 1)).astype(np.float32)
        img[mask] = rgb[None, :] + noise
        objects.append(SceneObject(shape, colour, _tight_box(mask), mask))
    objects.sort(key=lambda o: o.centre[0])
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    objs = tuple(objects)
    return Scene(image, objs, caption_for(objs), questions_for(objs, rng))


def generate_scenes(
    seed: int, count: int, kind: SceneKind = "single", size: int = 64
) -> list[Scene]:
    """``count`` scenes from ``seed``: single-object scenes, or 1-3 objects (``"multi"``).

    The same seed, count, kind and size give the same scenes byte for byte
    (numpy's PCG64 stream). Multi scenes draw 1, 2 or 3 objects with weights
    1:2:2 so that relations ("left of") are frequent.
    """
    if kind not in ("single", "multi"):
        raise UnknownNameError("scene kind", kind, ("single", "multi"))
    if count < 0:
        raise InvalidRequestError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = 1 if kind == "single" else int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
        out.append(generate_scene(rng, size, n))
    return out
