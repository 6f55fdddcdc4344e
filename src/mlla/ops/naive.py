"""Readable references: token-by-token recurrences and explicit ``N x N`` attention.

Slow by design (a Python loop over tokens, or an ``N x N`` matrix); they define what the fast
forms in :mod:`mlla.ops.linear_attention` and :mod:`mlla.ops.selective_scan` must compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_attention_quadratic", "linear_attention_recurrent", "selective_scan_ref"]


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_forget: torch.Tensor | None = None,
    normalize: bool = True,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal gated linear attention, one token at a time.

    ``q, k: (B, N, H, K)`` (kernel already applied), ``v: (B, N, H, V)`` (input gate already
    applied), ``log_forget``: ``(B, N, H, 1)`` or ``(B, N, H, K)``. For ``i = 1..N``::

        S = f_i S + k_i^T v_i ;  Z = f_i Z + k_norm_i ;  y_i = q_i S / (q_norm_i . Z + N eps)

    Returns ``y (B, N, H, V)`` and the final ``S (B, H, K, V)``.
    """
    B, N, H, K = q.shape
    q_norm = q if q_norm is None else q_norm
    k_norm = k if k_norm is None else k_norm
    S = q.new_zeros(B, H, K, v.shape[-1])
    Z = q.new_zeros(B, H, K)
    ys = []
    for i in range(N):
        f = log_forget[:, i].exp() if log_forget is not None else torch.ones_like(Z[..., :1])  # (B, H, 1 or K)
        S = f.unsqueeze(-1) * S + k[:, i].unsqueeze(-1) * v[:, i].unsqueeze(-2)
        y = (q[:, i].unsqueeze(-1) * S).sum(dim=-2)  # (B, H, V)
        if normalize:
            Z = f * Z + k_norm[:, i]
            y = y / ((q_norm[:, i] * Z).sum(dim=-1, keepdim=True) + N * eps)
        ys.append(y)
    return torch.stack(ys, dim=1), S


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention as an explicit ``N x N`` matrix: ``A = q k^T`` per head (masked to
    ``j <= i`` if causal), each row divided by its sum (``+ N eps``) if ``normalize``, times ``v``.

    ``q, k: (B, N, H, K)`` (kernel already applied), ``v: (B, N, H, V)`` -> ``(B, N, H, V)``.
    """
    N = q.shape[1]
    A = torch.einsum("bihk,bjhk->bhij", q, k)
    if causal:
        A = A * torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    if normalize:
        A = A / (A.sum(dim=-1, keepdim=True) + N * eps)
    return torch.einsum("bhij,bjhv->bihv", A, v)


def selective_scan_ref(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan, step by step (shapes of ``mamba_ssm``'s ``selective_scan_fn``).

    ``u, delta, z: (b, d, L)``; ``A: (d, n)``; ``B, C: (b, n, L)`` or grouped ``(b, g, n, L)``;
    ``D, delta_bias: (d,)``. For ``i = 1..L``, per channel ``c`` and state ``s``::

        h[c, s] = exp(delta_i[c] A[c, s]) h[c, s] + delta_i[c] B_i[s] u_i[c]
        y_i[c]  = sum_s C_i[s] h[c, s] + D[c] u_i[c]

    then ``y * SiLU(z)``. Returns ``y (b, d, L)`` and, if asked, the last ``h (b, d, n)``.
    """
    b, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B[:, None] if B.ndim == 3 else B.repeat_interleave(d // B.shape[1], dim=1)  # (b, 1 or d, n, L)
    C = C[:, None] if C.ndim == 3 else C.repeat_interleave(d // C.shape[1], dim=1)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for i in range(L):
        h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * B[..., i] * u[:, :, i, None]
        ys.append((C[..., i] * h).sum(dim=-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y
