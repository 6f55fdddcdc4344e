"""Top-1/top-5 accuracy and loss of a classifier over a loader, reduced over all processes."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...engine.distributed import DistEnv, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv = DistEnv(),
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    desc: str = "validate",
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate ``model`` on batches ``(images (B, 3, H, W), targets (B,), n_skipped)``.

    Returns ``loss`` (mean cross-entropy), ``top1`` and ``top5`` (%), ``images`` (counted) and
    ``skipped`` (unreadable images), over the whole dataset when run on every process.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, images, skipped
    for images, targets, skipped in tqdm(loader, desc=desc, leave=False, disable=not (progress and env.is_main)):
        sums[4] += skipped
        if not len(targets):
            continue
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums[1] += hits[:, 0].sum().item()
        sums[2] += hits.any(dim=1).sum().item()
        sums[3] += len(targets)
    model.train(was_training)
    loss, top1, top5, n, skipped = all_reduce_sum(sums, env).tolist()
    if n == 0:
        raise RuntimeError(f"no readable images to evaluate ({int(skipped)} unreadable)")
    return dict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n, images=int(n), skipped=int(skipped))
