"""Parameters and GFLOPs of Mask R-CNN on MLLA-T/S/B at 1280x800 (the paper's Table 4 figures are
in :data:`mlla.models.PAPER_RESULTS`).

Counted as mmdetection counts the paper's figures (``get_flops`` on ``forward_dummy``): one
1280x800 image through backbone, FPN and RPN head, the box head on 1000 RoIs and the mask head
on 100 RoIs; multiply-accumulates of convolutions and matmuls (``torch.utils.flop_counter``
FLOPs / 2; RoIAlign, NMS and elementwise ops not counted), the "FLOPs" of the paper's tables.
Built on the meta device: no memory, no compute.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import mask_rcnn

__all__ = ["detection_model_stats", "mask_rcnn_gmacs"]

def mask_rcnn_gmacs(model: nn.Module, size: tuple[int, int] = (800, 1280), box_rois: int = 1000, mask_rois: int = 100) -> dict[str, float]:
    """GMACs of the parts of a torchvision Mask R-CNN (see the module docstring), by part."""
    device = next(model.parameters()).device
    channels = model.backbone.out_channels
    parts: dict[str, float] = {}

    def count(name: str, fn) -> Any:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        parts[name] = counter.get_total_flops() / 2 / 1e9
        return out

    x = torch.zeros(1, 3, *size, device=device)
    features = count("backbone", lambda: model.backbone.body(x))
    pyramid = count("fpn", lambda: model.backbone.fpn(dict((str(i), f) for i, f in enumerate(features))))
    count("rpn_head", lambda: model.rpn.head(list(pyramid.values())))
    box_feats = torch.zeros(box_rois, channels, 7, 7, device=device)
    count("box_head", lambda: model.roi_heads.box_predictor(model.roi_heads.box_head(box_feats)))
    mask_feats = torch.zeros(mask_rois, channels, 14, 14, device=device)
    count("mask_head", lambda: model.roi_heads.mask_predictor(model.roi_heads.mask_head(mask_feats)))
    parts["total"] = sum(parts.values())
    return parts


def detection_model_stats(backbone: str, num_classes: int = 80) -> dict[str, Any]:
    """Parameters (M) and GMACs at 1280x800 of Mask R-CNN on ``backbone`` (COCO's 80 classes)."""
    with torch.device("meta"):
        model = mask_rcnn(backbone, num_classes)
        gmacs = mask_rcnn_gmacs(model.eval())
    body = sum(p.numel() for p in model.backbone.body.parameters())
    return dict(
        model=f"mask_rcnn_{backbone}", params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        backbone_params_m=body / 1e6, gmacs=gmacs["total"], gmacs_by_part=gmacs, input="1280x800",
    )
