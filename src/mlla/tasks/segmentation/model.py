"""UperNet on an MLLA backbone: the paper's ADE20K segmentation model (SPEC section 5).

Backbone: timm's ``features_only`` MLLA (strides 4, 8, 16, 32, each stage output through its own
LayerNorm ``norm0..norm3``, as the authors' segmentation backbone). Decode head:
``segmentation_models_pytorch``'s ``UPerNetDecoder`` with 512 channels and BatchNorm (pyramid
pooling over 1, 2, 3, 6 cells on the last stage, FPN fusion of the four stages, a 3x3 fusion
conv), the layout of mmseg's ``UPerHead``; then dropout 0.1 and a 1x1 classifier. Auxiliary
head: an FCN head (3x3 conv of 256 channels, BatchNorm, ReLU, dropout 0.1, 1x1 classifier) on
stage 3, trained with weight 0.4 (:data:`AUX_LOSS_WEIGHT`).

In eval mode the model returns logits ``(B, num_classes, H, W)`` at the input's size; in train
mode ``(main logits, auxiliary logits or None)``, both at the input's size.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn

from ...checkpoint import CheckpointError, read_checkpoint
from ...models import create_model
from ...models.backbone import load_backbone_checkpoint

__all__ = [
    "AUX_LOSS_WEIGHT", "FCNHead", "MIN_INPUT_SIZE", "UperNet", "upernet_stats", "load_upernet_weights",
    "upernet",
]

_logger = logging.getLogger(__name__)

#: Weight of the auxiliary head's loss (the paper's mmseg setting).
AUX_LOSS_WEIGHT = 0.4
#: The backbone's total stride: inputs must be at least this large on each side.
MIN_INPUT_SIZE = 32


class FCNHead(nn.Module):
    """The auxiliary head: ``(B, in_chs, h, w) -> (B, num_classes, h, w)`` logits."""

    def __init__(self, in_chs: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """UperNet with an optional FCN auxiliary head over a four-stage ``features_only`` backbone.

    Args:
        backbone: returns four maps at strides 4, 8, 16, 32 (NCHW, or NHWC with
            ``output_fmt == 'NHWC'`` as timm's Swin) and has ``feature_info`` (timm ``features_only``).
        num_classes: output classes (150 for ADE20K).
        channels: width of the pyramid pooling, FPN and fusion convs (512 in the paper).
        aux_head: add the auxiliary FCN head on stage 3.
        aux_channels: width of the auxiliary head (256 in the paper).
        dropout: dropout before each classifier.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        channels: int = 512,
        aux_head: bool = True,
        aux_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dims = list(backbone.feature_info.channels())
        if len(dims) != 4:
            raise ValueError(f"UperNet needs a backbone with four stages, got {len(dims)} ({dims})")
        self.num_classes = num_classes
        self.backbone = backbone
        # timm backbones that return channels-last maps (e.g. Swin) are permuted to NCHW.
        fmt = getattr(backbone, "output_fmt", "NCHW")
        self.features_nhwc = getattr(fmt, "value", fmt) == "NHWC"
        # smp's decoder reads features at strides 1, 2, 4, ..., 32 and uses those from stride 4 on:
        # the first two channel entries are placeholders it never reads.
        self.decode_head = UPerNetDecoder(
            encoder_channels=(0, 0, *dims), encoder_depth=5, decoder_channels=channels, use_norm="batchnorm"
        )
        # The backbone's norm0..norm3 already normalise each stage (as in mmseg's UPerHead setting):
        # smp's extra per-feature LayerNorms are replaced by identities.
        self.decode_head.feature_norms = nn.ModuleList(nn.Identity() for _ in dims)
        initialize_decoder(self.decode_head)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.auxiliary_head = FCNHead(dims[2], aux_channels, num_classes, dropout) if aux_head else None
        for conv in [self.classifier] + ([self.auxiliary_head.classifier] if aux_head else []):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"UperNet expects images (B, 3, H, W) with H, W >= {MIN_INPUT_SIZE} (the backbone's stride), "
                f"got shape {tuple(x.shape)}; pad or resize small images (mlla.tasks.segmentation.evaluate pads them)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes, H, W)`` (eval) or ``(logits, aux logits)`` (train)."""
        self._check_input(x)
        size = x.shape[-2:]
        features = self.backbone(x)
        if self.features_nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        logits = self.classifier(self.dropout(self.decode_head([x, x, *features])))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = F.interpolate(self.auxiliary_head(features[2]), size=size, mode="bilinear", align_corners=False)
        return logits, aux


def upernet(
    model_name: str,
    num_classes: int,
    *,
    aux_head: bool = True,
    backbone_checkpoint: str | os.PathLike | None = None,
    channels: int = 512,
    aux_channels: int = 256,
    dropout: float = 0.1,
    **kwargs: Any,
) -> UperNet:
    """UperNet (512 channels, FCN auxiliary head on stage 3) over the MLLA backbone ``model_name``.

    Args:
        model_name: a registered MLLA (``mlla_tiny``, ``mlla_small``, ``mlla_base``, ``test_mlla``).
        num_classes: output classes.
        aux_head: add the auxiliary head (trained with weight :data:`AUX_LOSS_WEIGHT`).
        backbone_checkpoint: backbone weights: one of our classification checkpoints, the
            authors' classification checkpoint, or the authors' segmentation/detection checkpoint
            (``backbone.*`` keys, ``norm0..norm3``; its heads are ignored). Every backbone weight
            must be there except, for a classification checkpoint, the per-stage norms (which
            it does not have: they keep their initial values, as in the authors' setting).
        channels, aux_channels: head widths (512 and 256 in the paper).
        dropout: dropout before each classifier (0.1 in the paper).
        **kwargs: backbone arguments (e.g. ``drop_path_rate``, or ``embed_dim``/``depths``/``num_heads``).
    """
    backbone = create_model(model_name, features_only=True, out_indices=(0, 1, 2, 3), **kwargs)
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(backbone, backbone_checkpoint)
    return UperNet(backbone, num_classes, channels=channels, aux_head=aux_head, aux_channels=aux_channels, dropout=dropout)



def load_upernet_weights(model: UperNet, path: str | os.PathLike) -> UperNet:
    """Initialise ``model`` from ``path``: a whole UperNet of ours (a ``mlla seg train`` checkpoint
    or its state dict; classifiers of another number of classes are kept from ``model``), or
    else backbone weights in any layout :func:`mlla.load_checkpoint` reads (ours, the authors'
    classification or ``backbone.*`` segmentation/detection checkpoints). Missing weights raise
    :class:`~mlla.CheckpointError`."""
    state = read_checkpoint(path)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    if not any(k.startswith("backbone.model.") for k in weights):
        load_backbone_checkpoint(model.backbone, path)
        return model
    own = model.state_dict()
    weights = dict(weights)
    resized = [k for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if any(not k.startswith(("classifier.", "auxiliary_head.classifier.")) for k in resized):
        raise CheckpointError(f"{path} does not fit the model (other backbone size or head width?): shapes of {resized[:5]} differ")
    if resized:
        _logger.warning("%s: classifiers for another number of classes; keeping the model's (fine-tuning)", path)
        weights.update({k: own[k] for k in resized})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}"
        )
    _logger.info("UperNet weights from %s", path)
    return model


def upernet_stats(model_name: str, img_size: tuple[int, int] = (512, 2048), num_classes: int = 150) -> dict[str, float]:
    """Parameters (M, auxiliary head included) and GMACs of one eval-mode forward pass at
    ``img_size`` (the auxiliary head does not run) of the ADE20K UperNet on ``model_name``,
    counted on the meta device (no memory, about a second)."""
    from ...profiling import count_gmacs, count_params

    with torch.device("meta"):
        model = upernet(model_name, num_classes)
    return dict(params_m=count_params(model) / 1e6, gmacs=count_gmacs(model, (3, *img_size)))
