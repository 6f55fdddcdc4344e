"""Initialising the MLLA backbone of a detector or segmenter from a checkpoint."""
from __future__ import annotations

import os

from torch import nn

from ..checkpoint import load_weights, read_checkpoint, select_weights

__all__ = ["load_backbone_checkpoint"]

# Where the backbone's weights sit in our own dense models' checkpoints: Mask R-CNN, UperNet.
_OWN_DENSE_PREFIXES = ("backbone.body.model.", "backbone.model.")


def load_backbone_checkpoint(backbone: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load MLLA weights into a ``features_only`` backbone; every backbone weight must be there.

    Accepts our classification checkpoints and the authors' (the classifier and final norm are
    dropped; the per-stage norms ``norm0..norm3``, which a classifier has not, keep their initial
    values, logged), the authors' detection and segmentation layouts (``backbone.*`` keys with
    ``norm0..norm3``; neck and heads dropped) and our own Mask R-CNN and UperNet checkpoints.
    Read safely and selected by the one rule of :func:`mlla.checkpoint.select_weights`.

    Raises:
        CheckpointError: unreadable file, another model size, or backbone weights missing.
    """
    weights = select_weights(read_checkpoint(path), source=str(path))
    for prefix in _OWN_DENSE_PREFIXES:
        if any(k.startswith(prefix) for k in weights):
            weights = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
            break
    return load_weights(backbone, weights, source=str(path))
