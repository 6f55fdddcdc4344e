"""The built-in segmentation demo dataset: generated scenes with per-pixel classes, written in
the ADE20K layout (``images/{training,validation}/*.jpg``, ``annotations/.../*.png``).

Each scene is a textured background (class ``background``) with two to five drawn regions of the
other classes (each class has its own hue, varied per region, and its own shape) that may
overlap. As in ADE20K, label 0 is "unlabelled": a one-pixel outline around each region is left
unlabelled, so label ``k`` in a file is class ``k - 1``. Generation is deterministic in ``seed``;
a marker file written last says the dataset is complete.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ...data.generated import add_noise, generate_once

__all__ = ["SEG_DEMO_CLASSES", "draw_seg_scene", "make_seg_demo_dataset"]

#: Class names of the demo (index = label in the annotation files minus one).
SEG_DEMO_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "bar", "ring")
# Base colour of each class's regions (the background's is drawn at random, dull).
_HUES = {"disc": (220, 60, 50), "box": (60, 190, 70), "triangle": (60, 90, 220), "bar": (230, 200, 40), "ring": (200, 60, 210)}
_MARKER = "seg_demo_dataset.json"


def _draw_region(draw: ImageDraw.ImageDraw, name: str, box: tuple[float, float, float, float], fill, width: int) -> None:
    x0, y0, x1, y1 = box
    if name == "disc":
        draw.ellipse(box, fill=fill)
    elif name == "box":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif name == "bar":
        cy = (y0 + y1) / 2
        draw.rectangle((x0, cy - width, x1, cy + width), fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=width)


def _outline(draw: ImageDraw.ImageDraw, name: str, box: tuple[float, float, float, float], width: int) -> None:
    """The region's one-pixel boundary, drawn as label 0 (unlabelled)."""
    x0, y0, x1, y1 = box
    if name in ("disc", "ring"):
        draw.ellipse(box, outline=0, width=1)
        if name == "ring":
            draw.ellipse((x0 + width, y0 + width, x1 - width, y1 - width), outline=0, width=1)
    elif name == "box":
        draw.rectangle(box, outline=0, width=1)
    elif name == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], outline=0)
    elif name == "bar":
        cy = (y0 + y1) / 2
        draw.rectangle((x0, cy - width, x1, cy + width), outline=0, width=1)


def draw_seg_scene(rng: random.Random, size: tuple[int, int] = (48, 48)) -> tuple[Image.Image, Image.Image]:
    """One scene: ``(RGB image, label map 'L')`` of ``size = (height, width)``."""
    h, w = size
    base = np.array([rng.randrange(60, 160) for _ in range(3)], np.float32)
    ramp = np.linspace(-25, 25, h, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.clip(base + ramp + np.zeros((h, w, 3), np.float32), 0, 255).astype(np.uint8))
    labels = Image.new("L", (w, h), 1)  # class 0 (background) is stored as 1
    draw_img, draw_lab = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    shapes = list(_HUES)
    for _ in range(rng.randint(2, 5)):
        name = rng.choice(shapes)
        extent = rng.uniform(0.3, 0.6) * min(h, w)
        x0, y0 = rng.uniform(-0.1 * extent, w - 0.9 * extent), rng.uniform(-0.1 * extent, h - 0.9 * extent)
        box = (x0, y0, x0 + extent, y0 + extent)
        width = max(3, int(extent * rng.uniform(0.15, 0.22)))
        colour = tuple(int(np.clip(c + rng.randint(-35, 35), 0, 255)) for c in _HUES[name])
        _draw_region(draw_img, name, box, colour, width)
        _draw_region(draw_lab, name, box, SEG_DEMO_CLASSES.index(name) + 1, width)
        _outline(draw_lab, name, box, width)  # later regions cover it where they overlap
    return add_noise(image, rng, 10), labels


def make_seg_demo_dataset(
    root: str | os.PathLike,
    train_images: int = 400,
    val_images: int = 40,
    img_size: tuple[int, int] = (48, 48),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the demo dataset to ``root`` (kept when a complete one with the same settings is
    there). Returns ``root``."""
    settings = dict(train_images=train_images, val_images=val_images, img_size=list(img_size), seed=seed,
                    classes=list(SEG_DEMO_CLASSES), version=2)
    jobs = [(split, i) for split, n in (("training", train_images), ("validation", val_images)) for i in range(n)]

    def write(root: Path) -> None:
        for split, i in tqdm(jobs, desc="generating segmentation demo", disable=not progress, leave=False):
            image, labels = draw_seg_scene(random.Random(f"{seed}/{split}/{i}"), tuple(img_size))
            for kind, picture, ext in (("images", image, "jpg"), ("annotations", labels, "png")):
                path = root / kind / split / f"scene_{i:05d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path, quality=95) if ext == "jpg" else picture.save(path)
        (root / "classes.json").write_text(json.dumps(list(SEG_DEMO_CLASSES)))

    return generate_once(root, settings, write, marker=_MARKER)
