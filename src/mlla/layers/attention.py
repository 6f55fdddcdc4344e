"""MLLA's token mixer: non-causal linear attention with RoPE and LePE (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import DepthwiseConvNHWC

__all__ = ["MllaLinearAttention"]


class MllaLinearAttention(nn.Module):
    """Multi-head linear attention over all ``N = H * W`` tokens, ``O(N)`` in time and memory.

    ``q, k = ELU(x Wqk) + 1`` (kernel), ``v = x``. RoPE rotates ``q`` and ``k`` for the
    numerator, the normaliser uses the un-rotated ones; per head::

        out_i = qr_i (sum_j kr_j^T v_j / N) / (q_i . mean_j k_j + 1e-6)

    and the LePE (a depthwise 3x3 convolution of ``v``) is added. The attention runs as batched
    matmuls on head-major ``(B, h, N, d)`` tensors: one layout copy of ``[q, k]`` and one of ``v``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.eps = eps
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.lepe = DepthwiseConvNHWC(dim)

    @staticmethod
    def head_major_rope(cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ``(H, W, 2C)`` over ``[q, k]`` -> ``(2, 1, h, N, d)``, the layout of ``forward``."""
        H, W, _ = cos.shape

        def layout(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(H * W, 2, num_heads, -1).permute(1, 2, 0, 3).unsqueeze(1).contiguous()

        return layout(cos), layout(sin)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: (B, H, W, C)``, ``rope``: tables from :meth:`head_major_rope` -> ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        N, h = H * W, self.num_heads
        qk = F.elu(self.qk(x)).add_(1.0)  # (B, H, W, 2C)
        qk = qk.view(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4).contiguous()  # (2, B, h, N, d)
        # RoPE in float32: (a, b) -> (a cos - b sin, a sin + b cos) per channel pair.
        cos, sin = rope
        qkf = qk.float()
        swapped = qkf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        qk_rot = torch.addcmul(qkf * cos, swapped, sin).to(qk.dtype)
        q, k = qk.unbind(0)  # (B, h, N, d) each
        q_rot, k_rot = qk_rot.unbind(0)
        v = x.view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)

        z = 1.0 / (q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) + self.eps)  # (B, h, N, 1)
        kv = (k_rot.transpose(-1, -2) @ v) / N  # (B, h, d, d)
        out = (q_rot @ kv) * z  # (B, h, N, d)
        lepe = self.lepe(x)  # (B, H, W, C), a fresh tensor: add the attention into it
        lepe.view(B, N, h, C // h).transpose(1, 2).add_(out)
        return lepe
