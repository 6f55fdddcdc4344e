"""MLLA's downsampling layer between stages (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import channels_last_kernel, fold_batchnorm

__all__ = ["MllaDownsample"]


class MllaDownsample(nn.Module):
    """Inverted-bottleneck stride-2 downsampling, ``dim -> out_dim``.

    ``conv1x1 (dim -> 8 dim) ReLU``, ``depthwise conv3x3 s2 ReLU``, ``conv1x1 (8 dim -> out_dim)
    BN``; convolutions carry biases. An odd height or width is zero-padded by one row/column
    (bottom/right) first.

    ``(B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int, expand_ratio: int = 8) -> None:
        super().__init__()
        hidden = dim * expand_ratio
        self.expand = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, out_dim, 1)
        self.norm = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
        if torch.compiler.is_exporting() or pad_h or pad_w:  # symbolic sizes: always pad
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = x.permute(0, 3, 1, 2)  # (B, dim, H, W), channels-last memory
        x = self.act(self._conv(self.expand, x))
        x = self.act(self._conv(self.dwconv, x))
        x = self.norm(self._conv(self.project, x))
        return x.permute(0, 2, 3, 1)

    @staticmethod
    def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` with its kernel marked channels-last (see ``channels_last_kernel``)."""
        return F.conv2d(x, channels_last_kernel(conv.weight), conv.bias, conv.stride, conv.padding, groups=conv.groups)

    def fuse(self) -> None:
        """Fold ``norm`` into ``project`` (inference); ``norm`` becomes an identity."""
        if isinstance(self.norm, nn.BatchNorm2d):
            fold_batchnorm(self.project, self.norm)
            self.norm = nn.Identity()
