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
from .backend import FirstLaunchError, fall_back_after
from .parallel import mlla_attention_torch

__all__ = ["FusedMllaAttention", "fused_mlla_attention"]


#: Shapes (and settings) the forward and the backward kernels have run for: their first launch compiles them.
_launched: set[tuple] = set()


def _first_launch(pass_: str, qk: torch.Tensor, width: int, run):
    """``run()``. The first time for this pass and shape, a failure either raises itself (backend
    ``"triton"``) or, under ``"auto"``, warns and raises :class:`FirstLaunchError`: the caller then
    computes the same by the PyTorch form (:func:`fall_back_after` decides)."""
    key = (pass_, qk.shape, qk.dtype, qk.device, width > 0, torch.backends.cuda.matmul.allow_tf32)
    if key in _launched:
        return run()
    try:
        result = run()
    except Exception as error:
        if not fall_back_after(error):
            raise
        raise FirstLaunchError(f"the fused MLLA attention kernel ({pass_}) failed at its first launch") from error
    _launched.add(key)
    return result


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
        if torch.compiler.is_compiling():
            out, state = _forward_op(qk, v, cos, sin, eps, width)
        else:
            out, state = _first_launch("forward", qk, width, lambda: kernel.forward(qk, v, cos, sin, eps, width))
        ctx.save_for_backward(qk, v, cos, sin, state)
        ctx.eps, ctx.width = eps, width
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qk, v, cos, sin, state = ctx.saved_tensors
        if torch.compiler.is_compiling():
            dqk, dv = _backward_op(grad_out, qk, v, cos, sin, state, ctx.eps, ctx.width)
            return dqk, dv, None, None, None, None
        try:
            dqk, dv = _first_launch(
                "backward", qk, ctx.width, lambda: kernel.backward(grad_out, qk, v, cos, sin, state, ctx.eps, ctx.width)
            )
        except FirstLaunchError:
            with torch.enable_grad():  # 'auto' fell back: the same gradients by the PyTorch form
                qk_, v_ = qk.detach().requires_grad_(), v.detach().requires_grad_()
                dqk, dv = torch.autograd.grad(mlla_attention_torch(qk_, v_, cos, sin, ctx.eps), (qk_, v_), grad_out)
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
