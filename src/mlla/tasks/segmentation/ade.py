"""Semantic segmentation data in the ADE20K layout, and the paper's (mmseg's) training augmentation.

Layout::

    root/images/training/<name>.jpg        root/annotations/training/<name>.png
    root/images/validation/<name>.jpg      root/annotations/validation/<name>.png

Annotations are single-channel PNG label maps. As in the ADE20K benchmark, label 0 means
"unlabelled": labels are shifted by -1 and 0 becomes :data:`IGNORE_INDEX` (``reduce_zero_label``),
so ``num_classes`` (150 for ADE20K) counts the real classes only.

Bad input never stops an epoch: an image without an annotation is left out when the split is
read (counted and logged); an unreadable file, a label map whose size differs from its image,
or one holding a label beyond ``num_classes`` is skipped when loaded (logged once, counted in
the batches' ``n_skipped``). Augmentation is a pure function of ``(seed, epoch, index)`` (as
:class:`mlla.data.ImageFolderDataset`), so a resumed run sees the same crops.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ...data import IMG_EXTENSIONS
from ...data.replace import UnusableSample, first_usable

__all__ = [
    "IGNORE_INDEX",
    "PadToSize",
    "RandomCropCatMax",
    "RandomRescale",
    "SegmentationDataset",
    "build_seg_transform",
    "collate_segmentation",
    "rescale_size",
]

_logger = logging.getLogger(__name__)

#: Label of pixels that are not scored (ADE20K's 0, after the shift).
IGNORE_INDEX = 255
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def rescale_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """The size an image of ``height x width`` takes when fitted, keeping its aspect ratio, into
    ``scale = (long, short)`` edge bounds times ``ratio`` (mmseg's keep-ratio resize)."""
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomRescale(v2.Transform):
    """Resize image and mask to :func:`rescale_size` with a ratio drawn from ``ratio_range``
    (mmseg's ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand(()).item()
        h, w = v2.query_size(flat_inputs)
        return dict(size=list(rescale_size(h, w, self.scale, ratio)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


class RandomCropCatMax(v2.Transform):
    """Random crop of at most ``size`` (smaller images are kept whole); with ``cat_max_ratio``
    < 1, up to 10 crops are drawn until no class covers more than that share of the crop's
    labelled pixels (mmseg's ``RandomCrop(cat_max_ratio=0.75)``)."""

    def __init__(self, size: int, cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX, tries: int = 10) -> None:
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index, self.tries = size, cat_max_ratio, ignore_index, tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = min(self.size, h), min(self.size, w)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        for _ in range(self.tries if self.cat_max_ratio < 1 and mask is not None else 1):
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            if mask is None or self.cat_max_ratio >= 1:
                break
            crop = mask[..., top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != self.ignore_index].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, params["top"], params["left"], params["height"], params["width"])


class PadToSize(v2.Transform):
    """Pad bottom and right to at least ``size`` x ``size``: images with 0 (after normalisation:
    the mean), masks with :data:`IGNORE_INDEX` (not scored)."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.ignore_index = size, ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return dict(padding=[0, 0, max(0, self.size - w), max(0, self.size - h)])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(TF.pad, inpt, params["padding"], fill=fill)


def build_seg_transform(
    is_training: bool,
    *,
    crop_size: int = 512,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Transform:
    """``(Image uint8 (3, H, W), Mask (H, W))`` -> ``(float image, mask)``.

    Training (mmseg's ADE20K recipe): random keep-ratio resize (``ratio_range`` of ``scale``),
    random crop of ``crop_size`` (``cat_max_ratio``), horizontal flip, photometric distortion
    (brightness, contrast, saturation, hue, each with probability 0.5), normalisation, padding
    to ``crop_size``. Evaluation: normalisation only (inference resizes, see
    :mod:`mlla.tasks.segmentation.evaluate`), the mask keeps the image's original size.
    """
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if not is_training:
        return v2.Compose(normalize)
    jitter = []
    if photometric:
        jitter = [
            v2.RandomApply([v2.ColorJitter(brightness=(1 - 32 / 255, 1 + 32 / 255))], p=0.5),
            v2.RandomApply([v2.ColorJitter(contrast=(0.5, 1.5))], p=0.5),
            v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))], p=0.5),
            v2.RandomApply([v2.ColorJitter(hue=18 / 180)], p=0.5),
        ]
    return v2.Compose([
        RandomRescale(scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(hflip),
        *jitter,
        *normalize,
        PadToSize(crop_size),
    ])


def _pairs(root: Path, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} not found; expected the ADE20K layout {root}/images/{split}/<name>.jpg with label maps "
                f"{root}/annotations/{split}/<name>.png"
            )
    pairs, missing = [], []
    for dirpath, _, files in sorted(os.walk(img_dir, followlinks=True)):
        for f in sorted(files):
            if not f.lower().endswith(IMG_EXTENSIONS):
                continue
            image = Path(dirpath) / f
            ann = ann_dir / image.relative_to(img_dir).with_suffix(".png")
            (pairs.append((str(image), str(ann))) if ann.is_file() else missing.append(str(image)))
    return pairs, missing


class SegmentationDataset(Dataset):
    """Image / label-map pairs of one split of an ADE20K-layout folder.

    ``__getitem__`` returns ``(image (3, H, W) float, mask (H, W) int64, n_skipped)``. A sample
    that cannot be used (see the module docstring) is logged once and replaced by the next good
    one (``replace_bad=True``, for training) or returned as ``None`` (evaluation:
    :func:`collate_segmentation` drops and counts it).

    Args:
        root: dataset folder (``images/`` and ``annotations/``).
        split: ``training`` or ``validation``.
        transform: a :func:`build_seg_transform` (``(Image, Mask) -> (image, mask)``).
        num_classes: classes after the shift; a label map holding a label beyond them is bad.
        reduce_zero_label: 0 is "unlabelled" (ADE20K): shift labels by -1, 0 -> :data:`IGNORE_INDEX`.
        replace_bad: replace rather than drop bad samples.
        seed: base of the per-sample random state (see :meth:`set_epoch`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[[Any], Any] | None,
        *,
        num_classes: int,
        reduce_zero_label: bool = True,
        replace_bad: bool = False,
        seed: int = 0,
    ) -> None:
        self.root, self.split = Path(root), split
        if not 1 <= num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be between 1 and {IGNORE_INDEX - 1} (label maps are 8-bit), got {num_classes}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"data directory not found: {self.root}")
        self.transform = transform
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.replace_bad = replace_bad
        self.seed, self.epoch = seed, 0
        self.samples, self.missing = _pairs(self.root, split)
        if self.missing:
            _logger.warning(
                "%s/images/%s: left out %d images without a label map in annotations/%s (e.g. %s)",
                self.root, split, len(self.missing), split, self.missing[0],
            )
        if not self.samples:
            raise ValueError(
                f"{self.root}: no image in images/{split} has a label map in annotations/{split} "
                f"({len(self.missing)} images without one)"
            )
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation (call before iterating a loader over this set)."""
        self.epoch = epoch

    def _warn_bad(self, index: int, reason: str) -> None:
        if index not in self._bad:
            self._bad.add(index)
            _logger.warning("skipping %s: %s", self.samples[index][0], reason)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask] | None:
        """The raw pair ``(Image uint8 (3, H, W), Mask uint8 (H, W))`` with labels shifted, or
        None (logged) when it cannot be used."""
        image_path, ann_path = self.samples[index]
        try:
            with Image.open(image_path) as img:
                image = np.array(img.convert("RGB"))
            with Image.open(ann_path) as ann:
                if ann.mode not in ("L", "P", "I;16", "I"):
                    self._warn_bad(index, f"label map {ann_path} has mode {ann.mode}; expected a single-channel (L or P) PNG")
                    return None
                labels = np.asarray(ann).astype(np.int64)
        except _READ_ERRORS as e:
            self._warn_bad(index, f"unreadable ({type(e).__name__}: {e})")
            return None
        if labels.shape != image.shape[:2]:
            self._warn_bad(
                index, f"label map {ann_path} is {labels.shape[1]}x{labels.shape[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]} (width x height); they must match"
            )
            return None
        top = self.num_classes if self.reduce_zero_label else self.num_classes - 1
        if labels.max() > top and (labels[labels > top] != IGNORE_INDEX).any():
            bad = int(labels[(labels > top) & (labels != IGNORE_INDEX)].max())
            self._warn_bad(
                index, f"label map {ann_path} holds label {bad}, beyond the {self.num_classes} classes "
                f"(labels 1..{top} and 0 = unlabelled{'' if self.reduce_zero_label else ', unshifted'}); "
                "check --num-classes"
            )
            return None
        if self.reduce_zero_label:
            labels = np.where(labels == 0, IGNORE_INDEX, np.where(labels == IGNORE_INDEX, IGNORE_INDEX, labels - 1))
        mask = tv_tensors.Mask(torch.from_numpy(labels.astype(np.uint8)))
        return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), mask

    def _transform(self, pair: tuple[tv_tensors.Image, tv_tensors.Mask], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = pair
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, index)) & 0xFFFF_FFFF)
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.load(index)
        if pair is None:
            raise UnusableSample(index)
        return self._transform(pair, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        sample, failed = first_usable(index, len(self), self._sample, replace=self.replace_bad, give_up=lambda failed: (
            f"{self.root}: {len(failed)} samples in a row from {self.samples[index][0]} cannot be used (see the "
            "warnings above); check the dataset and --num-classes"
        ))
        return None if sample is None else (*sample, int(bool(failed)))


def collate_segmentation(
    batch: list[tuple[torch.Tensor, torch.Tensor, int] | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``(images [(3, H_i, W_i)], masks [(H_i', W_i')], n_skipped)``, dropping ``None`` samples.

    Lists, because evaluation images keep their own sizes; training crops all have the crop
    size and are stacked by the task.
    """
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good) + sum(s[2] for s in good)
    return [s[0] for s in good], [s[1] for s in good], skipped
