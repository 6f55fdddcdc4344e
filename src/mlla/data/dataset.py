"""ImageFolder datasets that survive bad files: unreadable or corrupt images are skipped and
counted, non-image files are ignored with a warning, empty or missing splits are clear errors.

Augmentation is a pure function of ``(seed, epoch, index)``: each sample's transform runs under
its own random state, so a run resumed mid-epoch sees exactly the images an uninterrupted run
would, whatever the number of loader workers.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "collate_skipping", "find_split"]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MAX_CONSECUTIVE_BAD = 64
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def find_split(root: str | os.PathLike, split: str) -> Path:
    """``root/split``, or raise FileNotFoundError saying what the layout must be."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    path = root / split
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no '{split}' split in {root} (found folders: {', '.join(found) or 'none'}); expected the "
            f"ImageFolder layout {root}/{split}/<class>/<image files>"
        )
    return path


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**``; classes are the sorted folder names.

    ``__getitem__`` returns ``(image, target, n_skipped)``. An unreadable image is logged once
    and replaced by the next readable one (``n_skipped`` = 1) (``replace_bad=True``, for training: batches keep
    their size) or returned as ``None`` (for evaluation: :func:`collate_skipping` drops it).
    Either way it is counted.

    Args:
        root: folder with one sub-folder per class.
        transform: PIL image -> tensor ``(3, H, W)``.
        replace_bad: replace rather than drop unreadable images.
        seed: base of the per-sample random state (see :meth:`set_epoch`).
        class_to_idx: a fixed class mapping (e.g. the training split's) to check against.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        replace_bad: bool = False,
        seed: int = 0,
        class_to_idx: dict[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.replace_bad = replace_bad
        self.seed = seed
        self.epoch = 0
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{self.root} has no class folders; expected {self.root}/<class>/<image files>")
        if class_to_idx is not None and sorted(class_to_idx) != classes:
            missing, extra = sorted(set(class_to_idx) - set(classes)), sorted(set(classes) - set(class_to_idx))
            raise ValueError(
                f"classes of {self.root} differ from the training classes: missing {missing[:10]}, extra {extra[:10]}"
            )
        self.class_to_idx = class_to_idx or {c: i for i, c in enumerate(classes)}
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples: list[tuple[str, int]] = []
        ignored = []
        for c in classes:
            for dirpath, _, files in sorted(os.walk(self.root / c, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
                    elif not f.startswith("."):
                        ignored.append(os.path.join(dirpath, f))
        if ignored:
            _logger.warning(
                "%s: ignored %d files that are not images (by extension), e.g. %s",
                self.root, len(ignored), ignored[0],
            )
        if not self.samples:
            raise ValueError(
                f"{self.root} has {len(classes)} class folders but no images ({', '.join(IMG_EXTENSIONS)})"
            )
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation (call before iterating a loader over this set)."""
        self.epoch = epoch

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except _READ_ERRORS as e:
            if index not in self._bad:
                self._bad.add(index)
                _logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
            return None

    def _transform(self, img: Image.Image, index: int) -> Any:
        if self.transform is None:
            return img
        # The transform draws from python's, numpy's and torch's global generators: run it
        # under a state derived from (seed, epoch, index) and restore the caller's state.
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        sample_seed = hash((self.seed, self.epoch, index)) & 0xFFFF_FFFF
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        for skipped in range(min(len(self), _MAX_CONSECUTIVE_BAD)):
            i = (index + skipped) % len(self)
            img = self._load(i)
            if img is not None:  # counts 1 when the requested image was unreadable (once per epoch)
                return self._transform(img, i), self.samples[i][1], int(skipped > 0)
            if not self.replace_bad:
                return None
        raise RuntimeError(
            f"{self.root}: {min(len(self), _MAX_CONSECUTIVE_BAD)} images in a row from {self.samples[index][0]} "
            f"are unreadable; check the dataset (corrupt copy, wrong folder?)"
        )


def collate_skipping(batch: list[tuple[Any, int, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, target, n_skipped)`` samples, dropping ``None`` (unreadable) ones.

    Returns ``(images (B, 3, H, W), targets (B,), n_skipped)``; ``B`` may be 0.
    """
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good) + sum(s[2] for s in good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets, _ = default_collate(good)
    return images, targets, skipped
