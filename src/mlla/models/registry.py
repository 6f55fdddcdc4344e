"""The models this package registers in timm, and the paper's figures for them."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

__all__ = ["PAPER_RESULTS", "create_model", "list_models"]

# The paper's reported figures per model: parameters (M), GFLOPs as the paper counts them
# (multiply-accumulates), ImageNet-1K top-1 (%). Model modules add their entries here.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "mlla_tiny": dict(params_m=25.0, gmacs=4.2, top1=83.5),
    "mlla_small": dict(params_m=43.0, gmacs=7.3, top1=84.4),
    "mlla_base": dict(params_m=96.0, gmacs=16.2, top1=85.3),
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
