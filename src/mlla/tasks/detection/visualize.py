"""Pictures of detections: masks, boxes and class names drawn over the image (torchvision.utils
for masks and boxes, PIL for the labels), readable at any input size."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections"]

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (relative luminance, ITU-R BT.709)."""
    r, g, b = background
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


def draw_detections(image: torch.Tensor, detections: Mapping[str, torch.Tensor], class_names: Mapping[int, str],
                    *, mask_threshold: float = 0.5, min_side: int = 480) -> Image.Image:
    """``image`` uint8 ``(3, H, W)`` with each detection's mask (half transparent) and box in its
    class's colour and a ``name score`` label on a box of that colour (text in black or white,
    whichever contrasts), kept inside the picture.

    ``detections``: torchvision's output (``boxes`` in ``image``'s pixels, ``labels`` (the
    dataset's labels ``1..K``, named by ``class_names``), ``scores``, optional ``masks``
    ``(D, 1, H, W)``), already filtered. A picture whose shorter side is under ``min_side`` is
    enlarged by a whole factor first (so that small inputs stay legible); the result is
    ``(W * f, H * f)``.
    """
    h, w = image.shape[-2:]
    factor = max(1, math.ceil(min_side / max(1, min(h, w))))
    boxes = detections["boxes"].float() * factor
    masks = detections.get("masks")
    if factor > 1:
        image = F.interpolate(image[None].float(), scale_factor=factor, mode="bilinear", align_corners=False)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
        if masks is not None and len(masks):
            masks = F.interpolate(masks.float(), scale_factor=factor, mode="bilinear", align_corners=False)
    labels = detections["labels"].tolist()
    colours = [_PALETTE[(label - 1) % len(_PALETTE)] for label in labels]
    out = image
    if masks is not None and len(labels):
        out = draw_segmentation_masks(out, masks[:, 0] > mask_threshold, alpha=0.45, colors=colours)
    line = max(2, round(min(out.shape[-2:]) / 240))
    if len(labels):
        out = draw_bounding_boxes(out, boxes, colors=colours, width=line)
    picture = Image.fromarray(out.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, round(min(picture.size) / 28)))
    width, height = picture.size
    for box, label, score, colour in zip(boxes.tolist(), labels, detections["scores"].tolist(), colours):
        text = f"{class_names.get(label, f'label {label}')} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        x = min(max(box[0], 0), max(width - tw, 0))
        y = box[1] - th if box[1] - th >= 0 else box[1]  # above the box, else just inside its top
        y = min(max(y, 0), max(height - th, 0))
        draw.rectangle((x, y, x + tw, y + th), fill=colour, outline=_text_colour(colour))  # edged: legible on any background
        draw.text((x + line - left, y + line - top), text, font=font, fill=_text_colour(colour))
    return picture
