"""The fused Triton kernel as a PyTorch operator, joined by an :class:`torch.autograd.Function`.

In eager mode the Function launches the kernels directly (every microsecond of Python counts at
small batches: a GPU waits for the CPU that launches its kernels). Under ``torch.compile`` it
calls them through custom ops (``mlla::mlla_attention_fwd``, ``mlla::mlla_attention_bwd``), which
the compiler keeps whole in its graph.

Importing this module imports Triton; :mod:`mlla.ops.mlla_attn` does so only when the
attention backend asks for the kernel.
"""
from __future__ import annotations

import torch

from . import kernel

__all__ = ["FusedMllaAttention", "fused_mlla_attention"]


@torch.library.custom_op("mlla::mlla_attention_fwd", mutates_args=())
def _forward_op(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.forward(qk, v, cos, sin, eps, width)


@_forward_op.register_fake
def _(qk, v, cos, sin, eps, width):
    B, N, _, H, d = qk.shape
    return qk.new_empty((B, N, H, d)), qk.new_empty((B * H, kernel.state_size(d)), dtype=torch.float32)


@torch.library.custom_op("mlla::mlla_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    state: torch.Tensor, eps: float, width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.backward(grad_out, qk, v, cos, sin, state, eps, width)


@_backward_op.register_fake
def _(grad_out, qk, v, cos, sin, state, eps, width):
    return torch.empty_like(qk, memory_format=torch.contiguous_format), torch.empty_like(
        v, memory_format=torch.contiguous_format
    )


class FusedMllaAttention(torch.autograd.Function):
    """MLLA's attention by the fused kernel; saves the inputs and the ``d x d + d`` float32 state
    per (batch, head) for the backward (nothing of the size of the activation beyond the inputs).
    The RoPE tables get no gradient (they are constants of the grid)."""

    @staticmethod
    def forward(ctx, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                width: int) -> torch.Tensor:
        forward = _forward_op if torch.compiler.is_compiling() else kernel.forward
        out, state = forward(qk, v, cos, sin, eps, width)
        ctx.save_for_backward(qk, v, cos, sin, state)
        ctx.eps, ctx.width = eps, width
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qk, v, cos, sin, state = ctx.saved_tensors
        backward = _backward_op if torch.compiler.is_compiling() else kernel.backward
        dqk, dv = backward(grad_out, qk, v, cos, sin, state, ctx.eps, ctx.width)
        return dqk, dv, None, None, None, None


def fused_mlla_attention(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, width: int = 0
) -> torch.Tensor:
    """:func:`mlla.ops.mlla_attention` by the fused kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``qk: (B, N, 2, h, d)`` and ``v: (B, N, h, d)`` of one dtype (float32, bfloat16 or float16),
    ``cos, sin: (h, N, d/2)`` float32, ``width``: the token grid's width where the tables are those
    of :func:`mlla.ops.rope_2d_head_tables` (the kernel then reads only their first row and column;
    0: every row) -> ``(B, N, h, d)``, contiguous, in the inputs' dtype.
    """
    if qk.stride(-1) != 1:  # the kernel reads each head's channels as one contiguous row
        qk = qk.contiguous()
    return FusedMllaAttention.apply(qk, v, cos.contiguous(), sin.contiguous(), eps, width)
