"""Pictures of detections: masks, boxes and class names drawn over the image (torchvision.utils)."""
from __future__ import annotations

from typing import Mapping

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections"]

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


def draw_detections(image: torch.Tensor, detections: Mapping[str, torch.Tensor], class_names: Mapping[int, str],
                    *, mask_threshold: float = 0.5) -> Image.Image:
    """``image`` uint8 ``(3, H, W)`` with each detection's mask (half transparent), box and
    ``name score`` label in its class's colour. ``detections``: torchvision's output (``boxes``,
    ``labels``, ``scores``, optional ``masks`` ``(D, 1, H, W)``), already filtered."""
    labels = detections["labels"].tolist()
    colours = [_PALETTE[(label - 1) % len(_PALETTE)] for label in labels]
    out = image
    if "masks" in detections and len(labels):
        out = draw_segmentation_masks(out, detections["masks"][:, 0] > mask_threshold, alpha=0.45, colors=colours)
    if len(labels):
        text = [f"{class_names.get(label, label)} {score:.2f}" for label, score in zip(labels, detections["scores"].tolist())]
        width = max(1, round(max(image.shape[1:]) / 300))
        out = draw_bounding_boxes(out, detections["boxes"], labels=text, colors=colours, width=width)
    return Image.fromarray(out.permute(1, 2, 0).numpy())
