"""ImageFolder datasets that survive bad samples: a file that cannot be read or a transform
that raises on it is skipped and handed on as a :class:`~mlla.data.failures.SampleFailure` (the
loader's :class:`~mlla.data.failures.FailureLog` counts and logs it), non-image files are ignored
with a warning, empty or missing splits are clear errors. Every image mode reaches the transform
as 8-bit RGB with its content kept (:func:`~mlla.data.images.to_rgb`).

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
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .failures import SampleFailure, Skipped, describe_error
from .images import to_rgb
from .replace import UnusableSample, first_usable

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "collate_skipping", "find_split"]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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

    ``__getitem__`` returns ``(image, target, skipped)``. A sample whose file cannot be read or
    whose transform raises is replaced by the next good one (``replace_bad=True``, for training:
    batches keep their size; ``skipped`` counts and carries the failures, a
    :class:`~mlla.data.failures.Skipped`) or returned as a
    :class:`~mlla.data.failures.SampleFailure` (for evaluation: :func:`collate_skipping` drops
    it). Either way it is counted; nothing is logged here (see :mod:`mlla.data.failures`).

    Args:
        root: folder with one sub-folder per class.
        transform: PIL image -> tensor ``(3, H, W)``.
        replace_bad: replace rather than drop failed samples.
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

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation (call before iterating a loader over this set)."""
        self.epoch = epoch

    def _load(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as img:
            img.load()
            return to_rgb(img)

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

    def _sample(self, index: int) -> tuple[Any, int]:
        """``(image, target)`` of ``index``; raises :class:`UnusableSample` saying which stage failed."""
        path = self.samples[index][0]
        try:
            img = self._load(index)
        except Exception as e:  # any reader error: corrupt, truncated, not an image, odd mode
            raise UnusableSample(SampleFailure(index, path, "load", describe_error(e, path))) from e
        try:
            return self._transform(img, index), self.samples[index][1]
        except Exception as e:  # a transform that raises on this image: skip it, not the run
            raise UnusableSample(SampleFailure(index, path, "transform", describe_error(e, path))) from e

    def __getitem__(self, index: int) -> tuple[Any, int, Skipped] | SampleFailure:
        sample, failures = first_usable(index, len(self), self._sample, replace=self.replace_bad, give_up=lambda failures: (
            f"{self.root}: {len(failures)} samples in a row from {self.samples[index][0]} failed (unreadable "
            f"files or a failing transform), the last {failures[-1].path} ({failures[-1].kind}); check the dataset "
            f"(corrupt copy, wrong folder?) and the transform"
        ))
        if sample is None:
            return failures[0]
        # Only the requested sample counts: a replacement that failed too is counted when
        # it is requested itself (on whichever process), so each failure counts once an epoch.
        return *sample, Skipped(failures[:1])


def collate_skipping(batch: list[tuple[Any, int, int] | SampleFailure | None]) -> tuple[torch.Tensor, torch.Tensor, Skipped]:
    """Collate ``(image, target, skipped)`` samples, dropping failed ones (:class:`SampleFailure`
    or ``None``).

    Returns ``(images (B, 3, H, W), targets (B,), skipped)``; ``B`` may be 0. ``skipped`` is the
    number of failed samples, a :class:`~mlla.data.failures.Skipped` carrying their records.
    """
    good = [s for s in batch if isinstance(s, tuple)]
    failures = [s for s in batch if isinstance(s, SampleFailure)]
    for s in good:
        failures.extend(getattr(s[2], "failures", ()))
    skipped = Skipped(failures)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate([(s[0], s[1]) for s in good])
    return images, targets, skipped
