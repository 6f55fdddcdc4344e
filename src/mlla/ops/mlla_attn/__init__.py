"""MLLA's attention as one operator (SPEC section 3), in three forms that compute the same:

* :func:`~.naive.mlla_attention_naive`: the formula step by step, the readable reference;
* :func:`~.parallel.mlla_attention_torch`: the PyTorch form the model runs on CPU, under export
  and (by default) under ``torch.compile`` (and
  :func:`~.parallel.add_mlla_attention_`, its in-place inference variant);
* :func:`~.fused.fused_mlla_attention`: one fused Triton kernel (forward and backward), chosen
  by :func:`set_attention_backend` (see :mod:`.backend` for the rule: by default on CUDA in
  eager mode).
"""
from __future__ import annotations

import torch

from .backend import (
    BACKENDS, FirstLaunchError, attention_backend, fused_attention, get_attention_backend, set_attention_backend, uses_kernel,
)
from .naive import mlla_attention_naive
from .parallel import add_mlla_attention_, mlla_attention_torch

__all__ = [
    "BACKENDS", "add_mlla_attention_", "attention_backend", "get_attention_backend", "mlla_attention",
    "mlla_attention_naive", "mlla_attention_torch", "set_attention_backend", "uses_kernel",
]


def mlla_attention(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, *,
    width: int | None = None,
) -> torch.Tensor:
    """MLLA's linear attention over all ``N`` tokens, per head (no LePE)::

        q, k  = ELU(q) + 1, ELU(k) + 1
        out_n = R_n q_n (sum_m (R_m k_m)^T v_m / N) / (q_n . mean_m k_m + eps)

    with ``R_n`` the 2-d RoPE rotation of token ``n``'s channel pairs.

    Args:
        qk: ``(B, N, 2, h, d)``: the q and k projections stacked as one linear layer writes them
            (``Linear(C, 2C)`` viewed), each head's channel pairs interleaved (the authors' order).
        v: ``(B, N, h, d)``.
        cos, sin: ``(h, N, d/2)`` from :func:`mlla.ops.rope_2d_head_tables`.
        eps: normaliser epsilon.
        width: the token grid's width, where ``cos, sin`` are :func:`mlla.ops.rope_2d_head_tables`
            of that grid (the model passes it): the fused kernel then reads only the tables'
            first row and column, which hold all their angles. Without it, every row.

    Returns:
        ``(B, N, h, d)`` in the dtype of the computation (that of ``qk`` and ``v``).
    """
    if uses_kernel(qk, v, cos):
        fused = fused_attention()
        try:
            return fused(qk, v, cos, sin, eps, width or 0)
        except FirstLaunchError:  # 'auto' fell back, with a warning ('triton' raised what failed)
            pass
    return mlla_attention_torch(qk, v, cos, sin, eps)
