"""Segmentation inference and scores, as the ADE20K benchmark (mmseg) computes them.

Inference: the image is resized, keeping its aspect ratio, to fit the test scale (2048 x 512 for
ADE20K) times each ratio (1.0 single-scale; 0.5-1.75 multi-scale, optionally with horizontal
flips); the model runs on the whole resized image or on sliding windows (512 crops, stride 341,
overlaps averaged); each prediction is resized back to the original size and the softmax
probabilities are averaged.

Scores: a confusion matrix over labelled pixels (``torch.bincount``), summed over processes;
per-class IoU = TP / (TP + FP + FN) and accuracy = TP / (TP + FN); mIoU and mAcc average the
classes present (in the labels or the predictions for IoU, in the labels for accuracy); aAcc is
the share of labelled pixels predicted right. All in percent.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...engine.distributed import DistEnv, all_reduce_sum
from .ade import IGNORE_INDEX, rescale_size
from .model import MIN_INPUT_SIZE

__all__ = [
    "MS_RATIOS",
    "confusion_matrix",
    "evaluate_segmentation",
    "predict_probs",
    "segmentation_confusion",
    "segmentation_metrics",
    "slide_logits",
    "whole_logits",
]

#: The benchmark's multi-scale test ratios (of the test scale).
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted, over pixels whose
    ``target`` is not ``ignore_index``. ``pred`` and ``target``: integer maps of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    target, pred = target[valid].long(), pred[valid].long()
    if len(target) and int(target.max()) >= num_classes:
        raise ValueError(f"label {int(target.max())} is beyond the {num_classes} classes")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` (%) and per-class ``IoU``/``Acc`` lists (%, NaN for a class
    with no pixels to score) from a :func:`confusion_matrix`."""
    confusion = confusion.double()
    tp = confusion.diag()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - tp
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(labelled > 0, tp / labelled.clamp_min(1), nan)
    total = labelled.sum()
    return dict(
        mIoU=100 * iou.nanmean().item(),
        mAcc=100 * acc.nanmean().item(),
        aAcc=100 * (tp.sum() / total).item() if total > 0 else math.nan,
        IoU=(100 * iou).tolist(),
        Acc=(100 * acc).tolist(),
    )


def whole_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, K, H, W)``; images smaller than the backbone's stride are
    padded (with 0, the mean after normalisation) and the logits cropped back."""
    h, w = images.shape[-2:]
    pad_h, pad_w = max(0, MIN_INPUT_SIZE - h), max(0, MIN_INPUT_SIZE - w)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    return model(images)[..., :h, :w].float()


def slide_logits(model: nn.Module, images: torch.Tensor, num_classes: int, crop_size: int = 512, stride: int = 341) -> torch.Tensor:
    """Sliding-window logits ``(B, K, H, W)``: windows of ``crop_size`` every ``stride`` pixels
    (the last one flush with the border), overlapping logits averaged (mmseg's ``slide`` mode)."""
    b, _, h, w = images.shape
    rows = max(h - crop_size + stride - 1, 0) // stride + 1
    cols = max(w - crop_size + stride - 1, 0) // stride + 1
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    counts = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop_size, h), min(x1 + crop_size, w)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            logits[:, :, y1:y2, x1:x2] += whole_logits(model, images[:, :, y1:y2, x1:x2])
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


def predict_probs(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    scale: Sequence[int] = (2048, 512),
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop_size: int = 512,
    stride: int = 341,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Class probabilities ``(K, H, W)`` for one normalised image ``(3, H, W)`` at its own size,
    averaged over the test ``ratios`` of ``scale`` (and flips). ``model`` in eval mode."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    h, w = image.shape[-2:]
    probs = image.new_zeros((num_classes, h, w), dtype=torch.float32)
    n = 0
    for ratio in ratios:
        x = F.interpolate(image[None], size=rescale_size(h, w, scale, ratio), mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            with autocast():
                logits = slide_logits(model, xi, num_classes, crop_size, stride) if mode == "slide" else whole_logits(model, xi)
            logits = logits.float().flip(-1) if flipped else logits.float()
            probs += F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0].softmax(0)
            n += 1
    return probs / n


@torch.no_grad()
def segmentation_confusion(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    env: DistEnv = DistEnv(),
    *,
    progress: bool = True,
    desc: str = "validate",
    **inference: Any,
) -> tuple[torch.Tensor, int, int]:
    """``(confusion (K, K), images scored, samples skipped)`` over ``loader`` (batches of
    :func:`~mlla.tasks.segmentation.ade.collate_segmentation`), summed over all processes.
    ``inference``: :func:`predict_probs` options."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    counts = torch.zeros(2, dtype=torch.int64)  # images, skipped
    for images, masks, skipped in tqdm(loader, desc=desc, leave=False, disable=not (progress and env.is_main)):
        counts[1] += skipped
        for image, mask in zip(images, masks):
            probs = predict_probs(model, image.to(env.device, non_blocking=True), num_classes=num_classes, **inference)
            confusion += confusion_matrix(probs.argmax(0).cpu(), mask, num_classes)
            counts[0] += 1
    model.train(was_training)
    reduced = all_reduce_sum(torch.cat([confusion.flatten(), counts]), env)
    return reduced[:-2].view(num_classes, num_classes), int(reduced[-2]), int(reduced[-1])


def evaluate_segmentation(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    env: DistEnv = DistEnv(),
    *,
    progress: bool = True,
    desc: str = "validate",
    **inference: Any,
) -> dict[str, float]:
    """``mIoU``, ``mAcc``, ``aAcc`` (%), ``images`` and ``skipped`` over ``loader`` (see
    :func:`segmentation_confusion`)."""
    confusion, images, skipped = segmentation_confusion(model, loader, num_classes, env, progress=progress, desc=desc, **inference)
    if images == 0:
        raise RuntimeError(f"no usable images to evaluate ({skipped} skipped)")
    scores = segmentation_metrics(confusion)
    return dict(mIoU=scores["mIoU"], mAcc=scores["mAcc"], aAcc=scores["aAcc"], images=images, skipped=skipped)
