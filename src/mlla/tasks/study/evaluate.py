"""Per-group accuracy of a study run: top-1 of its checkpoint on each group of the built-in task's
classes (:data:`mlla.tasks.study.data.STUDY_GROUPS`: relational and counting)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .data import STUDY_GROUPS

__all__ = ["evaluate_groups"]


@torch.no_grad()
def evaluate_groups(checkpoint: str | os.PathLike, batch_size: int = 200) -> dict[str, Any]:
    """Top-1 (%) of ``checkpoint`` on its training data's validation split, overall and per group.

    Returns ``{'num_classes', 'top1', 'groups': {group: top-1}}``; ``groups`` is empty unless the
    classes are the built-in task's. Images go through the model's evaluation transform.
    """
    from ...checkpoint import read_checkpoint
    from .analyze import load_images, load_model

    model, info = load_model(str(checkpoint))
    class_to_idx: dict[str, int] = read_checkpoint(checkpoint)["class_to_idx"]
    val = Path(info["data_dir"]) / info["val_split"]
    hits: dict[str, list[bool]] = {c: [] for c in class_to_idx}
    for name, idx in class_to_idx.items():
        files = sorted(p for p in (val / name).iterdir() if p.is_file())
        for i in range(0, len(files), batch_size):
            pred = model(load_images(model, info, files[i : i + batch_size])).argmax(dim=-1)
            hits[name] += (pred == idx).tolist()
    every = [h for hs in hits.values() for h in hs]
    groups = {}
    if set(class_to_idx) == {c for cs in STUDY_GROUPS.values() for c in cs}:
        for group, classes in STUDY_GROUPS.items():
            grouped = [h for c in classes for h in hits[c]]
            groups[group] = 100.0 * sum(grouped) / len(grouped)
    return dict(num_classes=len(class_to_idx), top1=100.0 * sum(every) / max(1, len(every)), groups=groups)
