"""Parameter and multiply-accumulate counts, reproducible with ``torch.utils.flop_counter``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_gmacs", "count_params", "model_stats"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> float:
    """GMACs of one forward pass per image: ``torch.utils.flop_counter`` FLOPs / 2 / 1e9.

    Counts matmuls and convolutions (elementwise ops are not counted), as the paper's figures.
    The model runs on whatever device its parameters are on, the meta device included, with
    autograd on: models then take their functional path, not in-place inference shortcuts
    (such as in-place matmul accumulation) that the counter does not see.
    """
    param = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    # Blocks switched to their fused inference path (model.fuse()) count on the plain one, which
    # does the same arithmetic and runs with autograd on.
    fused = [m for m in model.modules() if getattr(m, "fused_inference", False)]
    for m in fused:
        m.fused_inference = False
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m in fused:
            m.fused_inference = True
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9 / batch_size


def model_stats(model_name: str, img_size: int = 224, **kwargs: Any) -> dict[str, float]:
    """Parameters (M) and GMACs at ``img_size`` of a registered model, built on the meta device."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, **kwargs)
    return dict(params_m=count_params(model) / 1e6, gmacs=count_gmacs(model, (3, img_size, img_size)))
