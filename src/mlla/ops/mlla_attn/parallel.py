"""MLLA's attention in PyTorch: the reference path of the model (CPU, export, FX, and CUDA unless
the fused kernel is switched on), and an in-place variant for eager inference.

Both compute :func:`mlla.ops.mlla_attn.naive.mlla_attention_naive`; they rotate q and k
straight into the head-major layout of the two matmuls, each head's channel pairs ``(a_p, b_p)``
de-interleaved (``[a_0 .. a_{d/2-1}, b_0 .. b_{d/2-1}]``). That reorders channels of q and k
alike, which changes no dot product within a head.
"""
from __future__ import annotations

import math

import torch

__all__ = ["add_mlla_attention_", "elu_plus_one", "mlla_attention_torch"]

_LOG2_E = math.log2(math.e)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1 = exp(min(x, 0)) + max(x, 0)`` (on CPUs ``F.elu`` goes through a slow
    ``expm1``, and ``exp2`` is faster than ``exp``)."""
    return torch.exp2(x.clamp_max(0.0) * _LOG2_E) + x.clamp_min(0.0)


def _elu_plus_one_(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`elu_plus_one` in place on ``x``; with a ``scratch`` tensor of ``x``'s shape it
    allocates nothing."""
    positive = torch.clamp_min(x, 0.0, out=scratch) if scratch is not None else x.clamp_min(0.0)
    return x.clamp_max_(0.0).mul_(_LOG2_E).exp2_().add_(positive)


def mlla_attention_torch(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``qk: (B, N, 2, h, d)``, ``v: (B, N, h, d)``, ``cos, sin: (h, N, d/2)`` -> ``(B, N, h, d)``
    (a transposed view of a head-major result). The rotation runs in the tables' dtype."""
    N = qk.shape[1]
    qk = elu_plus_one(qk)
    q, k = qk.unbind(2)  # (B, N, h, d)
    z = ((q * k.mean(dim=1, keepdim=True)).sum(-1) + eps).reciprocal()  # (B, N, h)

    # RoPE on pairs (a, b) -> (a cos - b sin, a sin + b cos), written head-major and de-interleaved.
    src = qk.permute(2, 0, 3, 1, 4)  # (2, B, h, N, d) view
    a, b = src[..., 0::2], src[..., 1::2]
    rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(qk.dtype)
    q_rot, k_rot = rot.unbind(0)  # (B, h, N, d)

    kv = (k_rot.transpose(-1, -2) @ v.transpose(1, 2)) / N  # (B, h, d, d)
    out = (q_rot @ kv) * z.transpose(1, 2).unsqueeze(-1)  # (B, h, N, d)
    return out.transpose(1, 2)


def add_mlla_attention_(
    out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``out += mlla_attention(qk, v, cos, sin)`` in place, without autograd: the eager inference
    path of :meth:`mlla.layers.MllaBlock.forward_fused`.

    ``qk: (B, N, 2, h, d)`` a fresh tensor with each head's channel pairs already de-interleaved
    (the projection's rows reordered), overwritten; ``out, v: (B, N, h, d)``. The pair swap of the
    rotation is then two contiguous slices, and the rotation's output buffer doubles as scratch
    space before it is written (fewer large allocations). Returns ``out``.
    """
    B, N, _, h, d = qk.shape
    rot = torch.empty((2, B, h, N, d), dtype=torch.promote_types(qk.dtype, cos.dtype), device=qk.device)
    scratch = rot.view(qk.shape) if rot.dtype == qk.dtype else None
    qk = _elu_plus_one_(qk, scratch=scratch)
    q, k = qk.unbind(2)  # (B, N, h, d) views

    q_dot_kmean = q * k.mean(dim=1, keepdim=True) if scratch is None else torch.mul(
        q, k.mean(dim=1, keepdim=True), out=scratch.view(-1)[: q.numel()].view(q.shape)
    )
    z = q_dot_kmean.sum(-1).add_(eps).reciprocal_()  # (B, N, h)

    src = qk.permute(2, 0, 3, 1, 4)  # (2, B, h, N, d) view
    a, b = src[..., : d // 2], src[..., d // 2:]
    rot_a, rot_b = rot[..., : d // 2], rot[..., d // 2:]
    torch.mul(a, cos, out=rot_a).addcmul_(b, sin, value=-1.0)
    torch.mul(a, sin, out=rot_b).addcmul_(b, cos)
    q_rot, k_rot = rot.to(qk.dtype).unbind(0)  # (B, h, N, d)

    kv = (k_rot.transpose(-1, -2) @ v.transpose(1, 2)) / N  # (B, h, d, d)
    attention = (q_rot @ kv).mul_(z.transpose(1, 2).unsqueeze(-1))  # (B, h, N, d)
    out.transpose(1, 2).add_(attention)
    return out
