"""The built-in demo dataset: ten classes of drawn shapes, generated on the spot (never
downloaded) and written as an ImageFolder (``root/train/<class>/*.png``, ``root/val/...``).

Each image is one shape of a random colour, size and position on a random background colour,
with pixel noise; classifying it needs shape, not colour. Generation is deterministic in ``seed``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

from ...data.generated import add_noise, contrasting_colour, generate_once, random_colour

__all__ = ["DEMO_CLASSES", "make_demo_dataset", "draw_demo_image"]

_Box = tuple[float, float, float, float]  # x0, y0, x1, y1 of the shape's bounding square


def _circle(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    d.ellipse(b, fill=fg)


def _square(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    d.rectangle(b, fill=fg)


def _triangle(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fg)


def _plus(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    d.rectangle((cx - w, y0, cx + w, y1), fill=fg)
    d.rectangle((x0, cy - w, x1, cy + w), fill=fg)


def _ring(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    d.ellipse(b, outline=fg, width=max(2, w))


def _cross(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    d.line((x0, y0, x1, y1), fill=fg, width=2 * w)
    d.line((x0, y1, x1, y0), fill=fg, width=2 * w)


def _hstripes(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    for k in range(3):
        y = y0 + (y1 - y0) * (k + 0.5) / 3
        d.rectangle((x0, y - w, x1, y + w), fill=fg)


def _vstripes(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    for k in range(3):
        x = x0 + (x1 - x0) * (k + 0.5) / 3
        d.rectangle((x - w, y0, x + w, y1), fill=fg)


def _frame(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    d.rectangle(b, outline=fg, width=max(2, w))


def _dots(d: ImageDraw.ImageDraw, b: _Box, fg: tuple, w: int) -> None:
    x0, y0, x1, y1 = b
    r = max(1.5, (x1 - x0) / 8)
    for fx, fy in ((0.2, 0.2), (0.8, 0.2), (0.2, 0.8), (0.8, 0.8)):
        cx, cy = x0 + (x1 - x0) * fx, y0 + (y1 - y0) * fy
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)


_SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, _Box, tuple, int], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "plus": _plus,
    "ring": _ring,
    "cross": _cross,
    "hstripes": _hstripes,
    "vstripes": _vstripes,
    "frame": _frame,
    "dots": _dots,
}
DEMO_CLASSES: tuple[str, ...] = tuple(_SHAPES)


def draw_demo_image(class_name: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``class_name`` (drawn at 4x, then downsampled)."""
    scale = 4
    s = size * scale
    bg = random_colour(rng)
    fg = contrasting_colour(rng, bg)  # keep the shape visible
    img = Image.new("RGB", (s, s), bg)
    extent = rng.uniform(0.45, 0.8) * s
    x0, y0 = rng.uniform(0, s - extent), rng.uniform(0, s - extent)
    width = max(1, int(extent * rng.uniform(0.06, 0.1)))
    _SHAPES[class_name](ImageDraw.Draw(img), (x0, y0, x0 + extent, y0 + extent), fg, width)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, fillcolor=bg)
    img = img.resize((size, size), Image.BICUBIC)
    return add_noise(img, rng, 12)


def make_demo_dataset(
    root: str | os.PathLike,
    train_per_class: int = 300,
    val_per_class: int = 50,
    img_size: int = 32,
    seed: int = 0,
    classes: Sequence[str] = DEMO_CLASSES,
    progress: bool = True,
) -> Path:
    """Write the demo dataset to ``root`` (skipped when a complete one with the same settings
    is there). Returns ``root``. ``classes`` picks some of :data:`DEMO_CLASSES`."""
    unknown = sorted(set(classes) - set(DEMO_CLASSES))
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; choose from {', '.join(DEMO_CLASSES)}")
    settings = dict(
        train_per_class=train_per_class, val_per_class=val_per_class, img_size=img_size, seed=seed,
        classes=list(classes), version=1,
    )
    jobs = [(split, c, i) for split, n in (("train", train_per_class), ("val", val_per_class)) for c in classes for i in range(n)]

    def write(root: Path) -> None:
        for split, c, i in tqdm(jobs, desc="generating demo dataset", disable=not progress, leave=False):
            path = root / split / c / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_demo_image(c, random.Random(f"{seed}/{split}/{c}/{i}"), img_size).save(path)

    return generate_once(root, settings, write, marker="demo_dataset.json")
