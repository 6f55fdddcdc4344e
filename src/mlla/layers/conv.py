"""Convolution building blocks shared by the MLLA stem, downsampling and blocks."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNorm", "DepthwiseConvNHWC"]


class ConvNorm(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` on NCHW maps (``conv``, ``bn``, ``act``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        act_layer: type[nn.Module] | None = nn.ReLU,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()


class DepthwiseConvNHWC(nn.Conv2d):
    """Depthwise ``k x k`` convolution (stride 1, 'same' padding) on channels-last tokens.

    Takes and returns ``(B, H, W, C)``. The permutes are views: the convolution runs on a
    channels-last NCHW tensor, so no layout copy is made around it.
    """

    def __init__(self, dim: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
