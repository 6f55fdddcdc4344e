"""The MLLA block: linear attention inside Mamba's block design (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .attention import MllaLinearAttention
from .conv import DepthwiseConvNHWC

__all__ = ["MllaBlock"]


class MllaBlock(nn.Module):
    """Mamba-like linear attention block on channels-last tokens ``(B, H, W, C)``.

    ::

        x = x + CPE(x)                               # one depthwise conv, identity in its kernel
        y = LN(x); y, g = in_proj(y)                 # input and gate projections, one matmul
        y = LinearAttention(SiLU(DWConv(y)))
        x = x + DropPath(out_proj(y * SiLU(g)))
        x = x + CPE(x)
        x = x + DropPath(MLP(LN(x)))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.cpe1 = DepthwiseConvNHWC(dim, residual=True)
        self.norm1 = norm_layer(dim)
        self.in_proj = nn.Linear(dim, 2 * dim)  # [input projection | gate projection]
        self.dwconv = DepthwiseConvNHWC(dim)
        self.attn = MllaLinearAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.cpe2 = DepthwiseConvNHWC(dim, residual=True)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: (B, H, W, C)``, ``rope``: RoPE tables (see ``MllaLinearAttention``) -> ``(B, H, W, C)``."""
        x = self.cpe1(x)
        # Eager inference reuses fresh tensors in place (fewer large allocations on CPUs);
        # autograd and the compiler get the functional form.
        inplace = not x.requires_grad and not torch.compiler.is_compiling()
        y, gate = self.in_proj(self.norm1(x)).chunk(2, dim=-1)
        y = self.attn(F.silu(self.dwconv(y), inplace=inplace), rope)
        y = y.mul_(F.silu(gate, inplace=True)) if inplace else y * F.silu(gate)
        x = self.drop_path(self.out_proj(y)).add_(x) if inplace else x + self.drop_path(self.out_proj(y))
        x = self.cpe2(x)
        if inplace:
            hidden = self.mlp.fc1(self.norm2(x))
            torch.ops.aten.gelu_(hidden)  # the MLP is fc1 -> GELU -> fc2 (no dropout, no norm)
            return self.drop_path(self.mlp.fc2(hidden)).add_(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))
