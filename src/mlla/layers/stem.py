"""MLLA's convolutional stem: patch size 4, embedding ``C`` (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import ConvNorm

__all__ = ["MllaStem"]


class MllaStem(nn.Module):
    """Overlapping convolutional patch embedding with stride 4.

    ``conv3x3 s2 (3 -> C/2) BN ReLU``, a residual pair of ``conv3x3 (C/2) BN`` (ReLU between),
    ``conv3x3 s2 (C/2 -> 4C) BN ReLU``, ``conv1x1 (4C -> C) BN``. An image whose sides are not
    multiples of 4 is zero-padded right/bottom first, as in the authors' dense-prediction code.

    ``(B, in_chans, H, W) -> (B, ceil(H / 4), ceil(W / 4), C)`` (channels-last tokens).
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 64) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.conv1 = ConvNorm(in_chans, hidden, 3, stride=2)
        self.res = nn.Sequential(
            ConvNorm(hidden, hidden, 3),
            ConvNorm(hidden, hidden, 3, act_layer=None),
        )
        self.conv2 = ConvNorm(hidden, embed_dim * 4, 3, stride=2)
        self.proj = ConvNorm(embed_dim * 4, embed_dim, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[-2] % 4, -x.shape[-1] % 4
        if torch.compiler.is_exporting() or pad_h or pad_w:  # symbolic sizes: always pad
            x = F.pad(x, (0, pad_w, 0, pad_h))
        # oneDNN's convolutions are about twice as fast channels-last, and the output permute
        # below then gives contiguous (B, H, W, C) tokens without a copy.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x)
        x = self.res(x).add_(x)
        x = self.proj(self.conv2(x))
        return x.permute(0, 2, 3, 1)  # (B, H/4, W/4, C)

    def fuse(self) -> None:
        """Fold every BatchNorm into its convolution (inference)."""
        for module in (self.conv1, *self.res, self.conv2, self.proj):
            module.fuse()
