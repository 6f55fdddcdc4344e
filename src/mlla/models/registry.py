"""The models this package registers in timm, and the paper's figures for them."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

__all__ = ["PAPER_RESULTS", "create_model", "list_models"]

#: The paper's figures, the one table of them: parameters (M) and GFLOPs as the paper counts them
#: (multiply-accumulates, ``gmacs``) of each model, with its accuracy. Classifiers (ImageNet-1K
#: top-1 %, at 224): by their registered names; model modules add theirs (the design study's).
#: Mask R-CNN 1x on COCO (Table 4; at 1280x800; box and mask AP): ``mask_rcnn_<backbone>``.
#: UperNet 160k on ADE20K (SPEC section 5; at 512x2048; single- and multi-scale mIoU): ``upernet_<backbone>``.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "mlla_tiny": dict(params_m=25.0, gmacs=4.2, top1=83.5),
    "mlla_small": dict(params_m=43.0, gmacs=7.3, top1=84.4),
    "mlla_base": dict(params_m=96.0, gmacs=16.2, top1=85.3),
    "mask_rcnn_mlla_tiny": dict(params_m=44.0, gmacs=255.0, box_ap=46.8, mask_ap=42.1),
    "mask_rcnn_mlla_small": dict(params_m=63.0, gmacs=319.0, box_ap=49.2, mask_ap=44.2),
    "mask_rcnn_mlla_base": dict(params_m=115.0, gmacs=502.0, box_ap=50.5, mask_ap=45.0),
    "upernet_mlla_base": dict(params_m=128.0, gmacs=1183.0, miou_ss=51.9, miou_ms=52.5),
}


def list_models(pattern: str = "") -> list[str]:
    """Names of the models registered by ``mlla`` (optionally filtered by a wildcard pattern)."""
    names = set(timm.list_models(module=["mlla", "ablation"]))
    if pattern:
        names &= set(timm.list_models(pattern))
    return sorted(names)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a registered model by name: the same call as ``timm.create_model``.

    Raises:
        ValueError: for a name that is not registered, with the closest known names.
    """
    if not timm.is_model(model_name):
        import difflib

        known = list_models() or timm.list_models()
        close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {model_name!r}.{hint} `mlla models` lists the models of this package.")
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
