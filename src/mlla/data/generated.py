"""Generated datasets (the tasks' built-in demo data): written once into a folder, kept while a
marker file says a complete one with the same settings is there, and the drawing helpers they share."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

__all__ = ["add_noise", "contrasting_colour", "generate_once", "random_colour"]


def generate_once(root: str | os.PathLike, settings: dict[str, Any], write: Callable[[Path], None], *, marker: str) -> Path:
    """``root`` after ``write(root)`` filled it, unless the ``marker`` file in it already holds
    ``settings`` (a complete earlier generation): an interrupted or different one is removed
    first, and the marker is written last. Returns ``root``."""
    root = Path(root)
    marker_path = root / marker
    if marker_path.is_file() and json.loads(marker_path.read_text()) == settings:
        return root
    if root.exists():
        shutil.rmtree(root)  # an interrupted or different earlier generation
    root.mkdir(parents=True)
    write(root)
    marker_path.write_text(json.dumps(settings))  # written last: marks the dataset complete
    return root


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    """An RGB colour, each channel uniform in 0..255."""
    return tuple(rng.randrange(256) for _ in range(3))


def contrasting_colour(rng: random.Random, background: tuple[int, int, int], min_distance: int = 200) -> tuple[int, int, int]:
    """A random colour at least ``min_distance`` (sum of channel differences) from ``background``."""
    colour = random_colour(rng)
    while sum(abs(a - b) for a, b in zip(background, colour)) < min_distance:
        colour = random_colour(rng)
    return colour


def add_noise(image: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """``image`` (RGB) plus Gaussian pixel noise of standard deviation ``sigma``, seeded from ``rng``."""
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
