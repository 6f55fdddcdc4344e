"""MLLA's downsampling layer between stages (SPEC section 3)."""
from __future__ import annotations

import torch
from torch import nn

from .conv import ChannelsLastConv2d, batchnorm_layout, fold_batchnorm, pad_to_multiple

torch.fx.wrap("pad_to_multiple")
torch.fx.wrap("batchnorm_layout")

__all__ = ["MllaDownsample"]


class MllaDownsample(nn.Module):
    """Inverted-bottleneck stride-2 downsampling, ``dim -> out_dim``.

    ``conv1x1 (dim -> 8 dim) ReLU``, ``depthwise conv3x3 s2 ReLU``, ``conv1x1 (8 dim -> out_dim)
    BN``; convolutions carry biases. An odd height or width is zero-padded by one row/column
    (bottom/right) first.

    ``(B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim)``.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        expand_ratio: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        hidden = dim * expand_ratio
        self.expand = ChannelsLastConv2d(dim, hidden, 1, **dd)
        self.dwconv = ChannelsLastConv2d(hidden, hidden, 3, stride=2, padding=1, groups=hidden, **dd)
        self.project = ChannelsLastConv2d(hidden, out_dim, 1, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2, dims=(1, 2))
        x = x.permute(0, 3, 1, 2)  # (B, dim, H, W), channels-last memory
        x = self.act(self.expand(x))
        x = self.act(self.dwconv(x))
        x = batchnorm_layout(self.project(x), self.training)
        return self.norm(x).permute(0, 2, 3, 1)

    def fuse(self) -> None:
        """Fold ``norm`` into ``project`` (inference); ``norm`` becomes an identity."""
        if isinstance(self.norm, nn.BatchNorm2d):
            fold_batchnorm(self.project, self.norm)
            self.norm = nn.Identity()
