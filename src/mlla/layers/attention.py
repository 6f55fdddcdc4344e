"""MLLA's token mixer: non-causal linear attention with RoPE and LePE (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rope import apply_rope_2d
from .conv import DepthwiseConvNHWC

__all__ = ["MllaLinearAttention"]


class MllaLinearAttention(nn.Module):
    """Multi-head linear attention over all ``N = H * W`` tokens, ``O(N)`` in time and memory.

    ``q, k = ELU(x Wqk) + 1`` (kernel), ``v = x``. RoPE rotates ``q`` and ``k`` for the
    numerator, the normaliser uses the un-rotated ones; per head::

        out_i = qr_i (sum_j kr_j^T v_j / N) / (q_i . mean_j k_j + 1e-6)

    and the LePE (a depthwise 3x3 convolution of ``v``) is added.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.eps = eps
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.lepe = DepthwiseConvNHWC(dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: (B, H, W, C)``, ``rope``: tables ``(H, W, 2C)`` -> ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        N, h = H * W, self.num_heads
        qk = F.elu(self.qk(x)) + 1.0  # (B, H, W, 2C)
        qk_rot = apply_rope_2d(qk, *rope)
        q, k = qk.reshape(B, N, 2, h, C // h).unbind(2)  # (B, N, h, d) each
        q_rot, k_rot = qk_rot.reshape(B, N, 2, h, C // h).unbind(2)
        v = x.reshape(B, N, h, C // h)

        z = 1.0 / (torch.einsum("bnhd,bhd->bnh", q, k.mean(dim=1)) + self.eps)  # (B, N, h)
        kv = torch.einsum("bnhd,bnhe->bhde", k_rot, v) / N  # (B, h, d, d)
        out = torch.einsum("bnhd,bhde->bnhe", q_rot, kv) * z.unsqueeze(-1)  # (B, N, h, d)
        return out.reshape(B, H, W, C) + self.lepe(x)
