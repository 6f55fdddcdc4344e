"""The built-in design-study task: classes defined by where things are and how many there are.

Eight classes, written as an ImageFolder (``root/train/<class>/*.png``, ``root/val/...``), in two
groups (:data:`STUDY_GROUPS`):

* relational, ``light_{left,right,above,below}``: one light square and one dark square far apart
  (their centres at least half the image apart along the named axis, less across it); the class
  is where the light square lies relative to the dark one. Both squares occur in every one of
  these images and look alike in every class, so no local patch tells the class: a model must
  relate two distant positions, which needs token mixing over the whole image *and* a sense of
  position (global linear attention without positional signal is blind to order).
* counting, ``count_{2,3,4,5}``: that many small light squares scattered over the image, no dark
  one; the class is a count over the whole image, which needs global reach but no order (a
  control every design should manage).

The light/dark contrast is fixed (light channels >= 215, dark <= 40, background 70-185 with
pixel noise), so recognising the objects is easy and the classes differ only in the relation or
the count. Generation is deterministic in ``seed`` (each image from its own seeded generator),
so the validation set is fixed; a marker file written last says the dataset is complete.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from ...data.generated import add_noise, generate_once
from ..classification.task import MIN_IMG_SIZE

__all__ = ["STUDY_CLASSES", "STUDY_GROUPS", "draw_study_image", "make_study_dataset", "study_dataset_settings"]

_DIRECTIONS = ("left", "right", "above", "below")
_COUNTS = (2, 3, 4, 5)
#: The task's two groups of classes: per-group accuracy is reported for each.
STUDY_GROUPS: dict[str, tuple[str, ...]] = {
    "relational": tuple(f"light_{d}" for d in _DIRECTIONS),
    "counting": tuple(f"count_{n}" for n in _COUNTS),
}
STUDY_CLASSES: tuple[str, ...] = STUDY_GROUPS["relational"] + STUDY_GROUPS["counting"]
_VERSION = 3  # bumped whenever the drawing changes: a dataset of another version is regenerated

_Box = tuple[float, float, float, float]


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(215, 256) for _ in range(3))  # type: ignore[return-value]


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(0, 41) for _ in range(3))  # type: ignore[return-value]


def _square(cx: float, cy: float, half: float) -> _Box:
    return cx - half, cy - half, cx + half, cy + half


def _overlaps(box: _Box, boxes: list[_Box], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _relation(rng: random.Random, direction: str, s: float) -> tuple[_Box, _Box]:
    """Boxes of (light, dark) squares with the light one ``direction`` of the dark one, centres
    >= s/2 apart along that axis and less far apart across it than along it."""
    along, across = (0, 1) if direction in ("left", "right") else (1, 0)
    sign = -1 if direction in ("left", "above") else 1  # light minus dark, along the axis
    while True:
        h_light, h_dark = rng.uniform(0.09, 0.13) * s, rng.uniform(0.09, 0.13) * s
        c_light = [rng.uniform(h_light, s - h_light) for _ in range(2)]
        c_dark = [rng.uniform(h_dark, s - h_dark) for _ in range(2)]
        gap = sign * (c_light[along] - c_dark[along])
        if gap >= 0.5 * s and abs(c_light[across] - c_dark[across]) < gap:
            return _square(*c_light, h_light), _square(*c_dark, h_dark)


def draw_study_image(class_name: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``class_name`` (drawn at 4x, then downsampled)."""
    if class_name not in STUDY_CLASSES:
        raise ValueError(f"unknown study class {class_name!r}; choose from {', '.join(STUDY_CLASSES)}")
    s = size * 4
    bg = tuple(rng.randrange(70, 186) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    kind, _, arg = class_name.partition("_")
    if kind == "light":
        light, dark = _relation(rng, arg, s)
        draw.rectangle(light, fill=_light(rng))
        draw.rectangle(dark, fill=_dark(rng))
    else:
        boxes: list[_Box] = []
        while len(boxes) < int(arg):
            half = rng.uniform(0.06, 0.08) * s
            box = _square(rng.uniform(half, s - half), rng.uniform(half, s - half), half)
            if not _overlaps(box, boxes, gap=0.06 * s):
                boxes.append(box)
                draw.rectangle(box, fill=_light(rng))
    img = img.resize((size, size), Image.BICUBIC)
    return add_noise(img, rng, 8)


def study_dataset_settings(
    train_per_class: int = 500, val_per_class: int = 100, img_size: int = 32, seed: int = 0
) -> dict[str, object]:
    """What identifies a generated study dataset (written to its ``study_dataset.json``)."""
    return dict(train_per_class=train_per_class, val_per_class=val_per_class, img_size=img_size, seed=seed,
                classes=list(STUDY_CLASSES), version=_VERSION)


def make_study_dataset(
    root: str | os.PathLike,
    train_per_class: int = 500,
    val_per_class: int = 100,
    img_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the study dataset to ``root`` (skipped when a complete one with the same settings
    is there; an incomplete or different one is replaced). Returns ``root``.

    ``img_size`` must be at least the training engine's smallest input (:data:`MIN_IMG_SIZE`).
    """
    if min(train_per_class, val_per_class) < 1:
        raise ValueError(f"need at least one image per class and split, got --train-per-class {train_per_class}, "
                         f"--val-per-class {val_per_class}")
    if img_size < MIN_IMG_SIZE:
        raise ValueError(f"--img-size {img_size}: the study trains at {MIN_IMG_SIZE} px or more (the training "
                         f"engine's smallest input); use --img-size {MIN_IMG_SIZE}")
    settings = study_dataset_settings(train_per_class, val_per_class, img_size, seed)

    def write(root: Path) -> None:
        jobs = [(split, c, i) for split, n in (("train", train_per_class), ("val", val_per_class))
                for c in STUDY_CLASSES for i in range(n)]
        for split, c, i in tqdm(jobs, desc="generating study dataset", disable=not progress, leave=False):
            path = root / split / c / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_study_image(c, random.Random(f"study/{seed}/{split}/{c}/{i}"), img_size).save(path)

    return generate_once(root, settings, write, marker="study_dataset.json")
