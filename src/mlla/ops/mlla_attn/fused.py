"""The fused Triton kernel as a PyTorch operator: custom ops (``mlla::mlla_attention_fwd``,
``mlla::mlla_attention_bwd``) that ``torch.compile`` keeps whole in its graph, joined by an
:class:`torch.autograd.Function`.

Importing this module imports Triton; :mod:`mlla.ops.mlla_attn` does so only when the
attention backend asks for the kernel.
"""
from __future__ import annotations

import torch

from . import kernel

__all__ = ["FusedMllaAttention", "fused_mlla_attention"]


@torch.library.custom_op("mlla::mlla_attention_fwd", mutates_args=())
def _forward_op(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.forward(qk, v, cos, sin, eps)


@_forward_op.register_fake
def _(qk, v, cos, sin, eps):
    B, N, _, H, d = qk.shape
    return qk.new_empty((B, N, H, d)), qk.new_empty((B * H, d, d), dtype=torch.float32), qk.new_empty(
        (B * H, d), dtype=torch.float32
    )


@torch.library.custom_op("mlla::mlla_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    kv: torch.Tensor, kmean: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.backward(grad_out, qk, v, cos, sin, kv, kmean, eps)


@_backward_op.register_fake
def _(grad_out, qk, v, cos, sin, kv, kmean, eps):
    return torch.empty_like(qk, memory_format=torch.contiguous_format), torch.empty_like(
        v, memory_format=torch.contiguous_format
    )


class FusedMllaAttention(torch.autograd.Function):
    """MLLA's attention by the fused kernel; saves the inputs and the ``d x d`` per-head ``kv``
    and key mean for the backward (nothing of the size of the activation beyond the inputs).
    The RoPE tables get no gradient (they are constants of the grid)."""

    @staticmethod
    def forward(ctx, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
        out, kv, kmean = _forward_op(qk, v, cos, sin, eps)
        ctx.save_for_backward(qk, v, cos, sin, kv, kmean)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qk, v, cos, sin, kv, kmean = ctx.saved_tensors
        dqk, dv = _backward_op(grad_out, qk, v, cos, sin, kv, kmean, ctx.eps)
        return dqk, dv, None, None, None


def fused_mlla_attention(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """:func:`mlla.ops.mlla_attention` by the fused kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``qk: (B, N, 2, h, d)`` and ``v: (B, N, h, d)`` of one dtype (float32, bfloat16 or float16),
    ``cos, sin: (h, N, d/2)`` float32 -> ``(B, N, h, d)``, contiguous, in the inputs' dtype.
    """
    return FusedMllaAttention.apply(qk, v, cos, sin, eps)
