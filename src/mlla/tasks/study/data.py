"""The built-in design-study task: classes defined by where things are, not what they look like.

Eight classes, written as an ImageFolder (``root/train/<class>/*.png``, ``root/val/...``):

* ``disc_{left,right,above,below}``: a disc and a square, both of random colours and sizes, far
  apart (at least half the image); the class is where the disc lies relative to the square.
  Both shapes occur in every one of these images, so no local patch tells the class: a model
  must relate two distant positions. A model whose token mixing ignores position (global linear
  attention without any positional signal, followed by average pooling) can only use what its
  local patch merging sees.
* ``count_{2,3,4,5}``: that many small squares scattered over the image; the class is a count
  across the whole image, which needs no order (a control: every design should manage it).

Every image has a random background colour and pixel noise; shapes never touch. Generation is
deterministic in ``seed`` (each image from its own seeded generator), so the validation set is
fixed; a marker file written last says the dataset is complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["STUDY_CLASSES", "draw_study_image", "make_study_dataset"]

_DIRECTIONS = ("left", "right", "above", "below")
_COUNTS = (2, 3, 4, 5)
STUDY_CLASSES: tuple[str, ...] = tuple(f"disc_{d}" for d in _DIRECTIONS) + tuple(f"count_{n}" for n in _COUNTS)

_Box = tuple[float, float, float, float]


def _colour(rng: random.Random, avoid: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        c = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(c, avoid)) >= 200:  # keep shapes visible
            return c  # type: ignore[return-value]


def _overlaps(box: _Box, boxes: list[_Box], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _relation(rng: random.Random, direction: str, s: float) -> tuple[_Box, _Box]:
    """Boxes of (disc, square) with the disc ``direction`` of the square, centres >= s/2 apart
    along that axis and less far apart across it than along it."""
    while True:
        r_disc, r_sq = rng.uniform(0.11, 0.15) * s, rng.uniform(0.10, 0.14) * s
        c_disc = [rng.uniform(r_disc, s - r_disc) for _ in range(2)]
        c_sq = [rng.uniform(r_sq, s - r_sq) for _ in range(2)]
        along, across = (0, 1) if direction in ("left", "right") else (1, 0)
        sign = -1 if direction in ("left", "above") else 1  # disc minus square, along the axis
        gap = sign * (c_disc[along] - c_sq[along])
        if gap >= 0.5 * s and abs(c_disc[across] - c_sq[across]) < gap:
            disc = (c_disc[0] - r_disc, c_disc[1] - r_disc, c_disc[0] + r_disc, c_disc[1] + r_disc)
            sq = (c_sq[0] - r_sq, c_sq[1] - r_sq, c_sq[0] + r_sq, c_sq[1] + r_sq)
            return disc, sq


def draw_study_image(class_name: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``class_name`` (drawn at 4x, then downsampled)."""
    if class_name not in STUDY_CLASSES:
        raise ValueError(f"unknown study class {class_name!r}; choose from {', '.join(STUDY_CLASSES)}")
    s = size * 4
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    kind, _, arg = class_name.partition("_")
    if kind == "disc":
        disc, sq = _relation(rng, arg, s)
        draw.ellipse(disc, fill=_colour(rng, bg))
        draw.rectangle(sq, fill=_colour(rng, bg))
    else:
        boxes: list[_Box] = []
        fg = _colour(rng, bg)
        while len(boxes) < int(arg):
            half = rng.uniform(0.06, 0.075) * s
            cx, cy = rng.uniform(half, s - half), rng.uniform(half, s - half)
            box = (cx - half, cy - half, cx + half, cy + half)
            if not _overlaps(box, boxes, gap=0.06 * s):
                boxes.append(box)
                draw.rectangle(box, fill=fg)
    img = img.resize((size, size), Image.BICUBIC)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def make_study_dataset(
    root: str | os.PathLike,
    train_per_class: int = 500,
    val_per_class: int = 100,
    img_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the study dataset to ``root`` (skipped when a complete one with the same settings
    is there; an incomplete or different one is replaced). Returns ``root``."""
    root = Path(root)
    if min(train_per_class, val_per_class) < 1 or img_size < 16:
        raise ValueError(f"need at least one image per class and split and img_size >= 16, got "
                         f"{train_per_class}, {val_per_class}, {img_size}")
    settings = dict(
        train_per_class=train_per_class, val_per_class=val_per_class, img_size=img_size, seed=seed,
        classes=list(STUDY_CLASSES), version=2,
    )
    marker = root / "study_dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    if root.exists():
        shutil.rmtree(root)
    jobs = [(split, c, i) for split, n in (("train", train_per_class), ("val", val_per_class))
            for c in STUDY_CLASSES for i in range(n)]
    for split, c, i in tqdm(jobs, desc="generating study dataset", disable=not progress, leave=False):
        path = root / split / c / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_study_image(c, random.Random(f"study/{seed}/{split}/{c}/{i}"), img_size).save(path)
    marker.write_text(json.dumps(settings))  # written last: marks the dataset complete
    return root
