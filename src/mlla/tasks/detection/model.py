"""Mask R-CNN on an MLLA backbone (or any timm ``features_only`` backbone), on torchvision's parts.

Layout of the detector (``torchvision.models.detection.MaskRCNN``): ``transform`` (normalise,
resize to ``min_size``/``max_size``, pad to a multiple of 32) -> ``backbone.body`` (timm
``features_only`` model, strides 4-32) -> ``backbone.fpn`` (torchvision ``FeaturePyramidNetwork``,
P2-P5 plus a max-pooled P6) -> ``rpn`` (5 anchor sizes, 3 ratios) -> ``roi_heads`` (box and mask
heads on ``MultiScaleRoIAlign`` over P2-P5).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ...checkpoint import unwrap_features_only
from ...models import create_model
from ...models.backbone import load_backbone_checkpoint

__all__ = ["TimmFpnBackbone", "load_backbone_checkpoint", "mask_rcnn", "mask_rcnn_backbone"]

_logger = logging.getLogger(__name__)

#: Anchor sizes per pyramid level (P2..P6) and aspect ratios, as mmdetection's Mask R-CNN
#: (scale 8 times strides 4..64).
DEFAULT_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)


class TimmFpnBackbone(nn.Module):
    """A timm ``features_only`` model followed by an FPN.

    ``(B, 3, H, W) -> OrderedDict('0': P2 (B, C, H/4, W/4), ..., '3': P5 (H/32), 'pool': P6)``
    with ``C = out_channels`` (the interface torchvision's detectors expect).

    Args:
        body: timm model built with ``features_only=True`` returning NCHW maps.
        out_channels: FPN channels.
        extra_blocks: extra FPN levels (default :class:`LastLevelMaxPool`, giving P6).
        norm_layer: normalisation in the FPN convolutions (none by default, as in the paper).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int = 256,
        *,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_info.channels()),
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def mask_rcnn_backbone(
    model_name: str,
    *,
    out_channels: int = 256,
    drop_path_rate: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> TimmFpnBackbone:
    """The backbone (``model_name`` as a timm ``features_only`` model) with its FPN.

    ``checkpoint`` initialises the backbone (see :func:`load_backbone_checkpoint`);
    ``backbone_kwargs`` go to ``timm.create_model`` (e.g. ``embed_dim`` for custom MLLA sizes).
    """
    kwargs = dict(backbone_kwargs or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    body = create_model(model_name, features_only=True, **kwargs)
    if checkpoint is not None:
        load_backbone_checkpoint(body, checkpoint)
    return TimmFpnBackbone(body, out_channels)


def mask_rcnn(
    model_name: str,
    num_classes: int,
    *,
    backbone_checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[Sequence[int]] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    box_representation_size: int = 1024,
    mask_head_channels: int = 256,
    backbone: nn.Module | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with an FPN on the timm backbone ``model_name`` (MLLA-T/S/B, ``test_mlla``,
    or any timm model with ``features_only``).

    Input/output contract (torchvision's): in training, ``model(images, targets)`` with
    ``images`` a list of ``(3, H_i, W_i)`` float tensors in ``[0, 1]`` of any sizes, and
    ``targets`` a list of dicts with ``boxes`` ``(N_i, 4)`` float ``x1, y1, x2, y2`` in pixels,
    ``labels`` ``(N_i,)`` int64 in ``1..num_classes`` (0 is the background) and ``masks``
    ``(N_i, H_i, W_i)`` uint8, returns a dict of losses (``loss_classifier``, ``loss_box_reg``,
    ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``). In eval mode ``model(images)``
    returns per image a dict with ``boxes`` ``(D, 4)``, ``labels`` ``(D,)``, ``scores`` ``(D,)``
    and ``masks`` ``(D, 1, H_i, W_i)`` probabilities, in the input image's pixel coordinates.

    Example::

        model = mask_rcnn("mlla_tiny", num_classes=80, backbone_checkpoint="mlla_tiny.pth").eval()
        detections = model([torch.rand(3, 480, 640)])[0]

    Args:
        model_name: timm model name of the backbone.
        num_classes: object classes, without the background.
        backbone_checkpoint: initial backbone weights (see :func:`load_backbone_checkpoint`).
        drop_path_rate: the backbone's stochastic depth (default: the model's own).
        backbone_kwargs: more arguments for ``timm.create_model`` (e.g. ``embed_dim``).
        fpn_channels: FPN and head input channels (256 as in the paper).
        min_size: shorter image side after resizing; a sequence is sampled from in training
            (multi-scale training) and its last value used in evaluation.
        max_size: cap on the longer side after resizing.
        anchor_sizes: anchor sizes per level P2..P6 (one tuple per level).
        aspect_ratios: anchor aspect ratios, the same on every level.
        box_representation_size: hidden width of the two-layer box head (1024 in the paper).
        mask_head_channels: channels of the four mask head convolutions (256 in the paper).
        backbone: a ready backbone with ``out_channels`` (replaces ``model_name``'s).
        **kwargs: more ``MaskRCNN`` options (e.g. ``rpn_anchor_generator``, ``box_roi_pool``,
            ``box_detections_per_img``, ``image_mean``), passed through.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1 (object classes, background excluded), got {num_classes}")
    if backbone is None:
        backbone = mask_rcnn_backbone(
            model_name, out_channels=fpn_channels, drop_path_rate=drop_path_rate, checkpoint=backbone_checkpoint,
            backbone_kwargs=backbone_kwargs,
        )
    channels = backbone.out_channels
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one entry per level P2..P6 (5), got {len(anchor_sizes)}")
    body_cfg = getattr(unwrap_features_only(getattr(backbone, "body", backbone)), "pretrained_cfg", {}) or {}
    kwargs.setdefault("image_mean", list(body_cfg.get("mean", (0.485, 0.456, 0.406))))
    kwargs.setdefault("image_std", list(body_cfg.get("std", (0.229, 0.224, 0.225))))
    anchors = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    kwargs.setdefault("rpn_anchor_generator", anchors)
    levels = ["0", "1", "2", "3"]
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2))
    kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2))
    kwargs.setdefault("box_head", TwoMLPHead(channels * 7 * 7, box_representation_size))
    kwargs.setdefault("mask_head", MaskRCNNHeads(channels, (mask_head_channels,) * 4, 1))
    if "box_predictor" not in kwargs:
        kwargs["box_predictor"] = FastRCNNPredictor(box_representation_size, num_classes + 1)
    if "mask_predictor" not in kwargs:
        kwargs["mask_predictor"] = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1)
    min_size = tuple(min_size) if isinstance(min_size, Sequence) else (int(min_size),)
    return MaskRCNN(backbone, num_classes=None, min_size=min_size, max_size=max_size, **kwargs)
