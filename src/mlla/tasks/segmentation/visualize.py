"""Colour-coded segmentation overlays with a legend of the classes shown (matplotlib)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...checkpoint import atomic_save

__all__ = ["class_palette", "save_overlay"]


def class_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours: matplotlib's tab20 first, then fixed random colours."""
    import matplotlib

    tab = (np.array(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, (max(0, num_classes - len(tab)), 3), dtype=np.uint8)
    return np.concatenate([tab, extra])[:num_classes]


def save_overlay(
    image: np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write ``image`` (``(H, W, 3)`` uint8) beside a greyscale copy with the class colours of
    ``labels`` (``(H, W)`` class indices) blended in, and a legend of the classes present (largest
    first, with their share of the picture), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    palette = class_palette(len(class_names))
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)  # class colours read true over grey
    blended = ((1 - alpha) * grey + alpha * palette[labels]).astype(np.uint8)
    ids, counts = np.unique(labels, return_counts=True)
    shown = [int(i) for i in ids[np.argsort(-counts)]][:20]
    h, w = labels.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(3.0, 4.0 * w / h) + 2.5, 4.0))
    for ax, picture, name in zip(axes, (image, blended), ("input", "prediction")):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    share = {int(i): 100 * c / labels.size for i, c in zip(ids, counts)}
    handles = [Patch(color=palette[i] / 255, label=f"{class_names[i]} ({share[i]:.0f}%)" if share[i] >= 1 else f"{class_names[i]} (<1%)")
               for i in shown]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)
