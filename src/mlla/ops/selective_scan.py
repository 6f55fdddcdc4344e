"""Mamba's selective scan as a configuration of :func:`gated_linear_attention`.

The paper's correspondence (SPEC section 1): ``C ~ Q``, ``B ~ K``, ``u ~ V``, ``h ~ S``. Each
channel ``c`` of ``u`` is one head with a single value (``V = 1``) and Q/K size ``n`` (the
state); all channels share ``B`` and ``C`` (one head in the paper's sense, per channel here
because the decay differs per channel). The switches:

* kernel: identity; attention normalization: off;
* input gate: ``delta`` (``h += delta B u``);
* forget gate: ``exp(delta[c] A[c, s])``, one per channel and state (key channel);
* shortcut: ``D``; the output gate ``SiLU(z)`` is applied after, as in Mamba's block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_attention import gated_linear_attention

__all__ = ["selective_scan"]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the arguments and results of ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u, delta: ``(batch, dim, L)``; ``delta`` (after bias and softplus) non-negative.
        A: ``(dim, state)``, non-positive: the state decays by ``exp(delta A) <= 1`` (the chunked
            form relies on it; Mamba parametrises ``A = -exp(A_log)``).
        B, C: ``(batch, state, L)``, or ``(batch, groups, state, L)`` with ``dim`` divisible by
            ``groups`` (channel ``c`` uses group ``c // (dim / groups)``).
        D, delta_bias: ``(dim,)``.
        z: ``(batch, dim, L)``, output gate ``y * SiLU(z)``.
        delta_softplus: ``delta = softplus(delta + delta_bias)``.
        return_last_state: also return the state after the last step, ``(batch, dim, state)``.
        chunk_size: tokens per chunk of the chunked causal form.

    Returns:
        ``y`` of shape ``(batch, dim, L)`` and dtype of ``u`` (and the last state, float32 or wider).
    """
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, state) = ({dim}, state), got {tuple(A.shape)}")
    n = A.shape[1]
    q, k = (_per_channel(t, name, batch, dim, n, L) for t, name in ((C, "C"), (B, "B")))
    delta = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_t = delta.transpose(1, 2).unsqueeze(-1)  # (batch, L, dim, 1)
    y, state = gated_linear_attention(
        q,
        k,
        u.transpose(1, 2).unsqueeze(-1),  # v: (batch, L, dim, 1)
        input_gate=delta_t,
        log_forget=delta_t * A,  # (batch, L, dim, state)
        shortcut=None if D is None else D[:, None],
        normalize=False,
        causal=True,
        chunk_size=chunk_size,
        return_state=True,
    )
    y = y.squeeze(-1).transpose(1, 2)  # (batch, dim, L)
    if z is not None:
        y = y * F.silu(z)
    y = y.to(u.dtype)
    return (y, state.squeeze(-1)) if return_last_state else y


def _per_channel(t: torch.Tensor, name: str, batch: int, dim: int, n: int, L: int) -> torch.Tensor:
    """``(batch, n, L)`` or ``(batch, g, n, L)`` -> queries/keys ``(batch, L, dim, n)`` (a view if shared)."""
    if t.ndim == 3 and t.shape == (batch, n, L):
        return t.transpose(1, 2).unsqueeze(2).expand(batch, L, dim, n)
    if t.ndim == 4 and t.shape[0] == batch and t.shape[2:] == (n, L) and dim % t.shape[1] == 0:
        return t.permute(0, 3, 1, 2).repeat_interleave(dim // t.shape[1], dim=2)
    raise ValueError(
        f"{name} must be (batch, state, L) = ({batch}, {n}, {L}) or (batch, groups, state, L) with groups "
        f"dividing dim={dim}, got {tuple(t.shape)}"
    )
