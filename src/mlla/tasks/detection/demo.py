"""The built-in detection demo data: drawn shapes with instance masks, written in COCO layout
(``root/annotations/instances_{train,val}.json``, ``root/{train,val}/*.png``), never downloaded.

Each image holds 1-4 non-overlapping shapes (circles, squares, triangles; random colour, size,
rotation) on a noisy background of another colour. Every shape is drawn as the polygon written
to the JSON, so masks are exact. Category ids are 1, 3, 7 (not contiguous, as COCO's are).
Generation is deterministic in ``seed``; a marker file written last makes it resumable.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from ...data.generated import add_noise, contrasting_colour, generate_once, random_colour

__all__ = ["DET_DEMO_CATEGORIES", "draw_det_demo_image", "make_det_demo_dataset"]

#: (category id, name) of the demo shapes.
DET_DEMO_CATEGORIES: tuple[tuple[int, str], ...] = ((1, "circle"), (3, "square"), (7, "triangle"))
_VERTICES = {"circle": 24, "square": 4, "triangle": 3}


def _polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    n = _VERTICES[name]
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def draw_det_demo_image(rng: random.Random, size: int = 160) -> tuple[Image.Image, list[dict]]:
    """One ``size`` x ``size`` image and its annotations (``category_id``, ``bbox``, ``segmentation``, ``area``)."""
    bg = random_colour(rng)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    anns = []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):  # find a free spot
            r = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat_id, name = rng.choice(DET_DEMO_CATEGORIES)
        fg = contrasting_colour(rng, bg)
        poly = _polygon(name, cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(poly, fill=fg)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        w, h = min(max(xs), size) - x0, min(max(ys), size) - y0
        area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
        anns.append(dict(
            category_id=cat_id, bbox=[round(v, 2) for v in (x0, y0, w, h)], area=round(area, 2), iscrowd=0,
            segmentation=[[round(c, 2) for p in poly for c in p]],
        ))
    return add_noise(img, rng, 10), anns


def make_det_demo_dataset(
    root: str | os.PathLike,
    train_images: int = 400,
    val_images: int = 60,
    img_size: int = 160,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the detection demo data to ``root`` (skipped when a complete one with the same
    settings is there). Returns ``root``."""
    settings = dict(train_images=train_images, val_images=val_images, img_size=img_size, seed=seed, version=1)
    categories = [dict(id=i, name=n, supercategory="shape") for i, n in DET_DEMO_CATEGORIES]

    def write(root: Path) -> None:
        (root / "annotations").mkdir()
        ann_id = 1
        for split, n in (("train", train_images), ("val", val_images)):
            (root / split).mkdir()
            images, annotations = [], []
            for i in tqdm(range(n), desc=f"generating detection demo ({split})", disable=not progress, leave=False):
                img, anns = draw_det_demo_image(random.Random(f"{seed}/{split}/{i}"), img_size)
                name = f"{i:05d}.png"
                img.save(root / split / name)
                images.append(dict(id=i + 1, file_name=name, width=img_size, height=img_size))
                for a in anns:
                    annotations.append(dict(a, id=ann_id, image_id=i + 1))
                    ann_id += 1
            data = dict(images=images, annotations=annotations, categories=categories)
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))

    return generate_once(root, settings, write, marker="det_demo_dataset.json")
