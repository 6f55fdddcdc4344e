"""Blocks of the paper's ablation models (SPEC section 2), on channels-last tokens ``(B, H, W, C)``.

* :class:`LinearAttentionBlock`: the Swin-T block with its window attention replaced by global
  :class:`GatedLinearAttention`; optional positional encodings APE and CPE.
* :class:`MambaStyleBlock`: Mamba's block design with the SSM replaced by linear attention
  (``+block design``); with an MLP after it ('sub') or without ('all').
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed_nhwc, trunc_normal_
from torch import nn

from .conv import DepthwiseConvNHWC
from .gated_attention import GatedLinearAttention

__all__ = ["AbsolutePosEmbed", "LinearAttentionBlock", "MambaStyleBlock"]


class AbsolutePosEmbed(nn.Module):
    """Learned absolute position embedding for a ``grid_size`` grid, added to ``(B, H, W, C)``.

    Another grid size gets the table resampled (bicubic), so any input size works.
    """

    def __init__(self, dim: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, *grid_size, dim))
        trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resample_abs_pos_embed_nhwc(self.pos, list(x.shape[1:3])).to(x.dtype)


class LinearAttentionBlock(nn.Module):
    """Transformer block with global linear attention::

        x = x + CPE(x)             # pos_embed='cpe': depthwise 3x3 convolution
        x = x + APE                # pos_embed='ape': learned, one table per block
        x = x + DropPath(Attn(LN(x)))
        x = x + DropPath(MLP(LN(x)))

    ``pos_embed`` 'lepe' and 'rope' act inside the attention. ``attn_kwargs`` are the switches of
    :class:`GatedLinearAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pos_embed: str | None = None,
        grid_size: tuple[int, int] = (56, 56),
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        self.cpe = DepthwiseConvNHWC(dim) if pos_embed == "cpe" else None
        self.ape = AbsolutePosEmbed(dim, grid_size) if pos_embed == "ape" else None
        attn_pe = pos_embed if pos_embed in ("lepe", "rope") else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GatedLinearAttention(dim, num_heads, pos_embed=attn_pe, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpe is not None:
            x = x + self.cpe(x)
        if self.ape is not None:
            x = self.ape(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MambaStyleBlock(nn.Module):
    """Mamba's block design with linear attention in place of the SSM::

        y = LN(x)
        a = SiLU(DWConv3x3(in_proj(y)))               # dim -> E dim
        x = x + DropPath(out_proj(Attn(a) * SiLU(gate_proj(y))))
        x = x + DropPath(MLP(LN(x)))                  # with_mlp ('sub' design) only

    The attention has ``v = a`` (no value or output projection of its own, as the SSM) and
    ``q, k`` projected from ``a`` (``E dim`` channels each), ``num_heads`` heads; ``E dim`` is
    rounded to a multiple of ``num_heads``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand: float = 2.0,
        with_mlp: bool = False,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        inner = num_heads * max(1, round(expand * dim / num_heads))  # E dim, rounded to whole heads
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, inner)
        self.gate_proj = nn.Linear(dim, inner)
        self.dwconv = DepthwiseConvNHWC(inner)
        self.attn = GatedLinearAttention(inner, num_heads, v_proj=False, out_proj=False, **attn_kwargs)
        self.out_proj = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim) if with_mlp else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU) if with_mlp else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        a = self.attn(F.silu(self.dwconv(self.in_proj(y))))
        x = x + self.drop_path(self.out_proj(a * F.silu(self.gate_proj(y))))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
