"""Gated linear attention: linear attention and Mamba's selective SSM as one operator.

The paper (SPEC section 1) writes both as one recurrence over tokens ``i = 1..N``, per head::

    S_i = f_i (.) S_{i-1} + k_i^T (g_i (.) v_i)          state, K x V
    Z_i = f_i (.) Z_{i-1} + k_i^T                         normaliser state, K
    y_i = (q_i S_i) / (q_i Z_i + N eps) + D (.) v_i

with six switches: the **kernel** ``phi`` applied to ``q, k`` (ELU+1 for linear attention,
identity for Mamba), the **input gate** ``g`` (Mamba's ``Delta``), the **forget gate** ``f``
(Mamba's ``exp(Delta A)``; it makes the computation causal), the **shortcut** ``D``, the
**attention normalization** (the division; Mamba has none) and the **heads** (the ``H`` axis
and the Q/K size ``K``; Mamba is one head with ``K`` = state size). Without a forget gate and
non-causal, every token sees every token: ``S = sum_j k_j^T g_j v_j``.

Layout: ``q, k: (B, N, H, K)``, ``v: (B, N, H, V)``; ``N`` tokens (an image raster-flattened),
``H`` heads, ``K`` the Q/K size and ``V`` the value size of a head.

Three computation modes, one result:

* ``parallel``: non-causal, no forget gate: ``q (k^T v)``, two matmuls, ``O(N)``;
* ``chunked``: causal (with or without forget gate): tokens in chunks of ``L``; inside a chunk the
  quadratic form with decays ``exp(b_i - b_j)`` from cumulative log-decays ``b``, factorised as
  ``exp(b_i - b_L) exp(b_L - b_j)`` (two matmuls) where the chunk's total decay cannot overflow a
  factor, in log space (only ``exp`` of non-positive numbers) where it could; between chunks the
  ``K x V`` state is passed on. ``O(N L)`` time, ``O(N)`` memory;
* ``recurrent``: the token-by-token loop above (:func:`mlla.ops.naive.linear_attention_recurrent`),
  the readable reference.

Normalisation as a mean: the sums are over all ``N`` tokens, so ``q S / (q Z + N eps)`` equals
``(q S / N) / (q Z / N + eps)``: MLLA's ``qr (kr^T v / N) / (q . mean(k) + eps)``. Sum or mean only
rescale numerator and denominator alike, which changes the result only through ``eps``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .naive import linear_attention_recurrent

__all__ = ["KERNELS", "feature_map", "gated_linear_attention"]

_LOG2_E = math.log2(math.e)
_MODES = ("auto", "parallel", "chunked", "recurrent")
# Default tokens per chunk (measured with benchmarks/ops_modes.py): the in-chunk work grows with
# the chunk, the number of sequential state-passing steps shrinks; GPUs favour fewer steps.
CHUNK_SIZE_CPU, CHUNK_SIZE_GPU = 32, 64


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` as ``2^(x log2 e)``: on CPUs ATen's ``exp2`` is about 3x faster than its ``exp``."""
    return torch.exp2(x * _LOG2_E)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1 = exp(min(x, 0)) + max(x, 0)`` (``F.elu`` goes through a slow ``expm1`` on CPUs)."""
    positive = F.relu(x)
    return _exp(x - positive) + positive


# The kernel phi applied to queries and keys.
KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu+1": _elu_plus_one,
    "relu": F.relu,
    "softplus": F.softplus,
}


def feature_map(kernel: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kernel function for a name in :data:`KERNELS` (or a callable, returned as is)."""
    if callable(kernel):
        return kernel
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {sorted(KERNELS)} or pass a function")
    return KERNELS[kernel]


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel: str | Callable[[torch.Tensor], torch.Tensor] = "identity",
    input_gate: torch.Tensor | None = None,
    log_forget: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
    normalize: bool = True,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
    mode: str = "auto",
    chunk_size: int | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with the switches of the paper's unified formulation.

    Args:
        q, k: queries and keys ``(B, N, H, K)`` (before the kernel).
        v: values ``(B, N, H, V)``.
        kernel: ``phi`` applied to ``q``, ``k``, ``q_norm``, ``k_norm``: a name of :data:`KERNELS`
            ('identity', 'elu+1', 'relu', 'softplus') or a function.
        input_gate: ``g``, multiplies ``v`` in the state update; broadcastable to ``(B, N, H, V)``.
        log_forget: ``log f <= 0``, the log of the forget gate, either one decay per head
            ``(B, N, H)`` / ``(B, N, H, 1)`` or one per key channel ``(B, N, H, K)``. Requires
            ``causal=True``.
        shortcut: ``D``, adds ``D (.) v_i`` (the un-gated value); broadcastable to ``(H, V)``.
        normalize: divide by ``phi(q_norm) Z_i + N eps`` (linear attention); off in Mamba.
        q_norm, k_norm: queries and keys of the normaliser only, ``(B, N, H, K)``; default ``q``
            and ``k``. MLLA rotates ``q, k`` by RoPE for the numerator but normalises with the
            un-rotated ones.
        causal: token ``i`` attends to tokens ``j <= i`` (raster order).
        eps: normaliser epsilon, as in a mean over tokens (see the module docstring).
        mode: 'parallel' (non-causal), 'chunked' or 'recurrent' (causal); 'auto' picks
            'parallel' or 'chunked'.
        chunk_size: tokens per chunk of the chunked mode; default 32 on a CPU, 64 on a GPU.
        return_state: also return the final state ``S_N``, ``(B, H, K, V)``.

    Returns:
        ``y`` of shape ``(B, N, H, V)`` (dtype of ``v``), and ``S_N`` if ``return_state``.
    """
    _check_inputs(q, k, v, q_norm, k_norm, log_forget, causal, mode)
    phi = feature_map(kernel)
    out_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)  # half inputs: float32 inside
    q, k, v = phi(q).to(dtype), phi(k).to(dtype), v.to(dtype)
    q_norm = phi(q_norm).to(dtype) if q_norm is not None else None
    k_norm = phi(k_norm).to(dtype) if k_norm is not None else None
    if log_forget is not None:
        log_forget = log_forget.to(dtype)
        if log_forget.ndim == 3:
            log_forget = log_forget.unsqueeze(-1)
    gated_v = v * input_gate.to(dtype) if input_gate is not None else v
    if mode == "auto":
        mode = "chunked" if causal else "parallel"

    if mode == "recurrent":
        y, state = linear_attention_recurrent(
            q, k, gated_v, log_forget=log_forget, normalize=normalize, q_norm=q_norm, k_norm=k_norm, eps=eps
        )
    elif mode == "parallel":
        y, state = _parallel(q, k, gated_v, normalize, q_norm, k_norm, eps)
    else:
        y, state = _chunked(q, k, gated_v, log_forget, normalize, q_norm, k_norm, eps, chunk_size)

    if shortcut is not None:
        y = y + shortcut.to(dtype) * v
    y = y.to(out_dtype)
    return (y, state) if return_state else y


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    log_forget: torch.Tensor | None,
    causal: bool,
    mode: str,
) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must have the same shape (B, N, H, K), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, N, H, V) with B, N, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        if t is not None and t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {_MODES}")
    if mode == "parallel" and causal:
        raise ValueError("mode='parallel' is the non-causal form; use mode='chunked' or 'recurrent' for causal=True")
    if mode in ("chunked", "recurrent") and not causal:
        raise ValueError(f"mode={mode!r} computes the causal form; pass causal=True, or use mode='parallel'")
    if log_forget is not None:
        if not causal:
            raise ValueError("a forget gate decays the state along the token order: pass causal=True")
        lf = log_forget.unsqueeze(-1) if log_forget.ndim == 3 else log_forget
        if lf.shape[:3] != q.shape[:3] or lf.shape[-1] not in (1, q.shape[-1]):
            raise ValueError(
                f"log_forget must be (B, N, H), (B, N, H, 1) or (B, N, H, K) = {tuple(q.shape)}, got {tuple(log_forget.shape)}"
            )


def _parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    normalize: bool,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal: ``y = q (k^T v)``, optionally ``/ (q_norm . sum k_norm + N eps)``."""
    kv = torch.einsum("bnhk,bnhv->bhkv", k, v)  # (B, H, K, V)
    y = torch.einsum("bnhk,bhkv->bnhv", q, kv)
    if normalize:
        qn = q if q_norm is None else q_norm
        k_sum = (k if k_norm is None else k_norm).sum(dim=1)  # (B, H, K)
        y = y / (torch.einsum("bnhk,bhk->bnh", qn, k_sum) + q.shape[1] * eps).unsqueeze(-1)
    return y, kv


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor | None,
    normalize: bool,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal form by chunks; the normaliser is one more value channel of ones (or a second scan).

    Works head-major, ``(B, H, N, X)``: the chunks of one head are then contiguous rows.
    """
    B, N, H, K = q.shape
    V = v.shape[-1]
    if log_forget is None:
        log_forget = q.new_zeros(B, N, H, 1)
    if chunk_size is None:
        chunk_size = CHUNK_SIZE_GPU if q.is_cuda else CHUNK_SIZE_CPU
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    q, k, v, log_forget = (t.transpose(1, 2) for t in (q, k, v, log_forget))
    if not normalize:
        y, state = _chunk_scan(q, k, v, log_forget, chunk_size)
    elif q_norm is None and k_norm is None:
        out, state = _chunk_scan(q, k, torch.cat([v, v.new_ones(B, H, N, 1)], dim=-1), log_forget, chunk_size)
        y, state = out[..., :V] / (out[..., V:] + N * eps), state[..., :V]
    else:
        y, state = _chunk_scan(q, k, v, log_forget, chunk_size)
        qn, kn = (t.transpose(1, 2) for t in (q if q_norm is None else q_norm, k if k_norm is None else k_norm))
        den, _ = _chunk_scan(qn, kn, v.new_ones(B, H, N, 1), log_forget, chunk_size)
        y = y / (den + N * eps)
    return y.transpose(1, 2), state


def _chunk_scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_forget: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_i = q_i S_i`` with ``S_i = f_i S_{i-1} + k_i^T v_i``, ``S_0 = 0``, chunk by chunk.

    Head-major: ``q, k: (B, H, N, K)``, ``v: (B, H, N, V)``, ``log_forget: (B, H, N, F)`` with
    ``F`` 1 or ``K``. Returns ``y (B, H, N, V)`` and ``S_N (B, H, K, V)``.

    Each head's tokens are cut into chunks of ``L``: one row ``(L, X)`` per batch, head and
    chunk, so that every product below is one batched matmul. With ``b_i`` the cumulative
    log-decay inside the chunk (``b_i <= 0``, non-increasing) and ``b_L`` its total, token ``i``
    of a chunk reads ``q_i exp(b_i) S_in`` from the state entering the chunk, the chunk writes
    ``sum_j exp(b_L - b_j) k_j^T v_j`` into the state leaving it (both factors ``<= 1``), and
    inside the chunk ``y_i = sum_{j <= i} (q_i . exp(b_i - b_j) (.) k_j) v_j``.
    """
    B, H, N, K = q.shape
    pad = -N % chunk  # padded tokens (k = v = 0, no decay) come last: they change nothing before them
    n_chunks = (N + pad) // chunk

    def rows(t: torch.Tensor) -> torch.Tensor:  # (B, H, N, X) -> (B H n_chunks, L, X)
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.reshape(B * H * n_chunks, chunk, t.shape[-1])

    q, k, v, log_forget = rows(q), rows(k), rows(v), rows(log_forget)
    V = v.shape[-1]
    b = log_forget.cumsum(dim=1)  # (R, L, F)
    b_end = b[:, -1:]  # (R, 1, F)
    q_in = q * _exp(b)  # reads the entering state: q_i exp(b_i)
    k_out = k * _exp(b_end - b)  # writes the leaving state: k_j exp(b_L - b_j)

    # Between chunks: each chunk's own contribution to the state, then the states passed on.
    chunk_states = (k_out.transpose(1, 2) @ v).view(B * H, n_chunks, K, V)
    entering, state = _pass_states(chunk_states, b_end.exp().view(B * H, n_chunks, -1, 1))

    y = torch.baddbmm(_intra_chunk(q, k, v, b, q_in, k_out), q_in, entering.view(-1, K, V))
    return y.view(B, H, n_chunks * chunk, V)[:, :, :N], state.view(B, H, K, V)


def _pass_states(chunk_states: torch.Tensor, chunk_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_c = d_c S_{c-1} + s_c`` over chunks ``c``, ``S_0 = 0``.

    ``chunk_states: (G, n, K, V)``, ``chunk_decay: (G, n, F, 1)``. Returns the states entering
    each chunk ``(G, n, K, V)`` and the last state ``(G, K, V)``.
    """
    state = chunk_states.new_zeros(chunk_states[:, 0].shape)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = torch.addcmul(chunk_states[:, c], chunk_decay[:, c], state)
    return torch.stack(entering, dim=1), state


def _intra_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor, q_in: torch.Tensor, k_out: torch.Tensor
) -> torch.Tensor:
    """``y_i = sum_{j <= i} (q_i . exp(b_i - b_j) (.) k_j) v_j`` inside each row ``(L, X)``.

    Factorised ``exp(b_i - b_j) = exp(b_i - b_L) exp(b_L - b_j)``: the scores are one matmul of
    ``q_in exp(-b_L)`` and ``k_out``, masked to ``j <= i``. Exact while the row's total decay
    ``-b_L`` is at most :func:`_max_log_factor` (no factor overflows or turns subnormal); rows
    that decay more are recomputed in log space (:func:`_intra_chunk_exact`).
    """
    if torch.compiler.is_compiling():  # a traced graph has no data-dependent branch: all rows exact
        return _intra_chunk_exact(q, k, v, b)
    limit = _max_log_factor(q.dtype)
    b_end = b[:, -1:]
    scores = (q_in * _exp((-b_end).clamp(max=limit))) @ k_out.transpose(1, 2)
    y = scores.tril_() @ v
    if y.is_meta:  # shapes only (MAC counting): no decays to look at
        return y
    strong = (b_end.amin(dim=-1).squeeze(1) < -limit).nonzero().squeeze(1)
    if strong.numel():
        y = y.index_put((strong,), _intra_chunk_exact(q[strong], k[strong], v[strong], b[strong]))
    return y


def _intra_chunk_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`_intra_chunk` with the decays ``exp(b_i - b_j)`` in log space: only ``exp`` of
    non-positive numbers, stable for any decay; an ``(L, L, F)`` tensor per row."""
    L = b.shape[1]
    future = torch.ones(L, L, dtype=torch.bool, device=b.device).triu(1)  # j > i
    decay = (b[:, :, None] - b[:, None]).masked_fill(future[..., None], float("-inf")).exp()  # (R, L, L, F)
    if b.shape[-1] == 1:  # one decay per head: it factors out of q_i . k_j
        scores = (q @ k.transpose(1, 2)) * decay[..., 0]
    else:
        scores = torch.einsum("rik,rijk->rij", q, decay * k[:, None])
    return scores @ v


def _max_log_factor(dtype: torch.dtype) -> float:
    """Largest ``|log|`` of a decay factor of the factorised form: half the log of the largest
    number of ``dtype`` (44 in float32), so factors and their products with ``q, k`` stay finite
    and normal."""
    return math.log(torch.finfo(dtype).max) / 2
