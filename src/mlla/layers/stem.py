"""MLLA's convolutional stem: patch size 4, embedding ``C`` (SPEC section 3)."""
from __future__ import annotations

import torch
from torch import nn

from .conv import ConvNorm, batchnorm_layout, pad_to_multiple

torch.fx.wrap("pad_to_multiple")
torch.fx.wrap("batchnorm_layout")

__all__ = ["MllaStem"]


class MllaStem(nn.Module):
    """Overlapping convolutional patch embedding with stride 4.

    ``conv3x3 s2 (3 -> C/2) BN ReLU``, a residual pair of ``conv3x3 (C/2) BN`` (ReLU between),
    ``conv3x3 s2 (C/2 -> 4C) BN ReLU``, ``conv1x1 (4C -> C) BN``. An image whose sides are not
    multiples of 4 is zero-padded right/bottom first, as in the authors' dense-prediction code.

    ``(B, in_chans, H, W) -> (B, ceil(H / 4), ceil(W / 4), C)`` (channels-last tokens).
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        hidden = embed_dim // 2
        self.conv1 = ConvNorm(in_chans, hidden, 3, stride=2, **dd)
        self.res = nn.Sequential(
            ConvNorm(hidden, hidden, 3, **dd),
            ConvNorm(hidden, hidden, 3, act_layer=None, **dd),
        )
        self.conv2 = ConvNorm(hidden, embed_dim * 4, 3, stride=2, **dd)
        self.proj = ConvNorm(embed_dim * 4, embed_dim, 1, act_layer=None, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 4, dims=(2, 3))
        # Channels-last: oneDNN's convolutions are about twice as fast so, cuDNN's too, and the
        # output permute below then gives contiguous (B, H, W, C) tokens without a copy. Training
        # on a CPU keeps the stem NCHW: its train-mode BatchNorms are accurate only there.
        x = batchnorm_layout(x.contiguous(memory_format=torch.channels_last), self.training)
        x = self.conv1(x)
        x = x + self.res(x)
        x = self.proj(self.conv2(x))
        return x.permute(0, 2, 3, 1)  # (B, H/4, W/4, C)

    def fuse(self) -> None:
        """Fold every BatchNorm into its convolution (inference)."""
        for module in (self.conv1, *self.res, self.conv2, self.proj):
            module.fuse()
