"""MLLA's attention, the readable reference: the formula of SPEC section 3, one step per line.

Slow and allocation-heavy by design; it defines what the PyTorch form
(:mod:`mlla.ops.mlla_attn.parallel`) and the fused Triton kernel
(:mod:`mlla.ops.mlla_attn.fused`) compute. Tests run it in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mlla_attention_naive"]


def mlla_attention_naive(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``qk: (B, N, 2, h, d)`` (q and k projections, pairs interleaved), ``v: (B, N, h, d)``,
    ``cos, sin: (h, N, d/2)`` (:func:`mlla.ops.rope_2d_head_tables`) -> ``(B, N, h, d)``.

    Per batch and head, with ``R_n`` the rotation of token ``n``'s channel pairs::

        q, k = ELU(q) + 1, ELU(k) + 1
        kv   = sum_n (R_n k_n)^T v_n / N                   (d x d)
        out_n = (R_n q_n) kv / (q_n . mean_m k_m + eps)
    """
    q, k = (F.elu(t) + 1 for t in qk.unbind(2))  # (B, N, h, d)
    cos, sin = cos.transpose(0, 1).to(q.dtype), sin.transpose(0, 1).to(q.dtype)  # (N, h, d/2)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # pairs (a, b) -> (a cos - b sin, a sin + b cos)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    q_rot, k_rot = rotate(q), rotate(k)
    N = qk.shape[1]
    kv = torch.einsum("bnhk,bnhv->bhkv", k_rot, v.to(q.dtype)) / N
    z = 1.0 / (torch.einsum("bnhk,bhk->bnh", q, k.mean(dim=1)) + eps)
    return (torch.einsum("bnhk,bhkv->bnhv", q_rot, kv) * z.unsqueeze(-1)).to(v.dtype)
