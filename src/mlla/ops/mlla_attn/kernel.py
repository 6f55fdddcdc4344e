"""Triton kernels of MLLA's attention: feature map, RoPE, ``kv``, normaliser and output fused.

Per (batch, head) the forward reads the tokens twice and the backward twice:

* forward pass 1 (:func:`_kv_kernel`), grid (batch x heads, token chunks): ``kr = R phi(k)``,
  partial sums of ``kr^T v`` (``d x d``) and of ``phi(k)`` per chunk;
  the chunks' partials are summed in float32 (one deterministic reduction, no atomics; none
  where one chunk covers all tokens);
* forward pass 2 (:func:`_out_kernel`), grid (token blocks, batch x heads):
  ``out = (R phi(q)) kv / (phi(q) . mean(phi(k)) + eps)``;
* backward pass 1 (:func:`_bwd_q_kernel`), grid (batch x heads, token chunks): ``dq`` and the
  chunks' partial gradients of ``kv`` and of ``mean(phi(k))``;
* backward pass 2 (:func:`_bwd_kv_kernel`), grid (token blocks, batch x heads): ``dk`` and ``dv``.

The state between the passes is one float32 row per (batch, head): the sums of ``kr^T v`` and of
``phi(k)`` (``d x d + d``), divided by ``N`` where they are read; nothing of size ``N`` is saved
for the backward beyond the inputs. Each head's tokens are read as contiguous ``d``-channel rows
and split into the halves of the channel pairs ``(a_p, b_p) = (x_{2p}, x_{2p+1})``, so the rotation
``(a cos - b sin, a sin + b cos)`` and its transpose need no shuffles; ``kv`` and the key sums are
kept with rows in that order (``[a_0 .. a_{d/2-1}, b_0 .. b_{d/2-1}]``), which changes no dot
product.

RoPE tables ``(h, N, d/2)`` are read per token, or, given the grid's width ``W`` (tables of
:func:`mlla.ops.rope_2d_head_tables`, whose angle of a pair depends on the token's row for the
first ``C/4`` pairs and on its column for the others), only at the grid's first column (row
angles) and first row (column angles): the same values, with a table traffic of ``H + W`` rows
instead of ``N``.

Inputs may be float32, bfloat16 or float16 (the same for q/k and v), the tables float32;
everything is computed in float32, the matmuls take their operands in the input dtype (float32:
IEEE, or TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it) and accumulate in
float32. Any token count and any even head dim (blocks are padded to powers of two, at least 16).

Under ``TRITON_INTERPRET=1``, set before Triton is first imported (``tests/conftest.py`` sets it
where there is no CUDA device), Triton's interpreter runs the kernels on CPU tensors, with small
blocks; its ``tl.dot`` cannot multiply bfloat16 (it sees the raw bits), so there bfloat16
operands are multiplied in float32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .backend import interpreter_requested

__all__ = ["backward", "forward", "interpreted"]


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable itself
    return interpreter_requested() if knobs is None else bool(knobs.runtime.interpret)


@triton.jit
def _features(base, n, mask_n, s_n, h, cos_ptr, sin_ptr, s_th, s_tn, H, W,
              HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, SEPARABLE: tl.constexpr):
    """q or k (contiguous channels at ``base``) of tokens ``n`` as pair halves ``(a, b)``: ``phi(a),
    phi(b)`` (ELU+1, 0 where masked), their RoPE rotation ``(a cos - b sin, a sin + b cos)``, and
    ``cos, sin``."""
    p = tl.arange(0, BLOCK_HALF)
    ch = tl.arange(0, 2 * BLOCK_HALF)
    rows = n.to(tl.int64)[:, None]
    x = tl.load(base + rows * s_n + ch[None, :], mask=mask_n[:, None] & (ch < 2 * HALF)[None, :], other=0.0)
    xa, xb = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_N, BLOCK_HALF, 2)))
    m = mask_n[:, None] & (p < HALF)[None, :]
    fa = tl.where(m, tl.exp(tl.minimum(xa, 0.0)) + tl.maximum(xa, 0.0), 0.0)
    fb = tl.where(m, tl.exp(tl.minimum(xb, 0.0)) + tl.maximum(xb, 0.0), 0.0)
    if SEPARABLE:  # row angles at the grid's first column, column angles at its first row
        uses_row = (h * HALF + p) < (H * HALF) // 2
        trow = tl.where(uses_row[None, :], (n // W * W)[:, None], (n % W)[:, None]).to(tl.int64)
    else:
        trow = rows
    t = h * s_th + trow * s_tn + p[None, :]
    cs = tl.load(cos_ptr + t, mask=m, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + t, mask=m, other=0.0).to(tl.float32)
    return fa, fb, fa * cs - fb * sn, fa * sn + fb * cs, cs, sn


@triton.jit
def _store_pairs(base, n, mask_n, s_n, ga, gb, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Store the pair halves ``ga, gb`` as contiguous channels ``(a_0, b_0, a_1, b_1, ...)`` of tokens ``n``."""
    ch = tl.arange(0, 2 * BLOCK_HALF)
    g = tl.reshape(tl.join(ga, gb), (BLOCK_N, 2 * BLOCK_HALF))
    tl.store(base + n.to(tl.int64)[:, None] * s_n + ch[None, :], g.to(base.dtype.element_ty),
             mask=mask_n[:, None] & (ch < 2 * HALF)[None, :])


@triton.jit
def _state_pointers(state_ptr, index, HALF: tl.constexpr, DV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    """Pointers to the first row half of ``kv`` ``(d/2, d)`` and of the key sum ``(d/2)`` in state
    row ``index`` (the second halves follow at ``+ HALF * DV`` and ``+ HALF``), with their masks."""
    p = tl.arange(0, BLOCK_HALF)
    c = tl.arange(0, BLOCK_DV)
    mask_p = p < HALF
    row = state_ptr + index.to(tl.int64) * (2 * HALF * DV + 2 * HALF)
    return row + p[:, None] * DV + c[None, :], row + 2 * HALF * DV + p, mask_p[:, None] & (c < DV)[None, :], mask_p


@triton.jit
def _load_state(state_ptr, index, scale, HALF: tl.constexpr, DV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_DV: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Row halves of ``kv`` (or its gradient) ``(d, d)`` and of the key sum ``(d)`` of state row
    ``index``, times ``scale``."""
    kv, km, mask, mask_p = _state_pointers(state_ptr, index, HALF, DV, BLOCK_HALF, BLOCK_DV)
    kv_a = (tl.load(kv, mask=mask, other=0.0) * scale).to(DOT_DTYPE)
    kv_b = (tl.load(kv + HALF * DV, mask=mask, other=0.0) * scale).to(DOT_DTYPE)
    return kv_a, kv_b, tl.load(km, mask=mask_p, other=0.0) * scale, tl.load(km + HALF, mask=mask_p, other=0.0) * scale


@triton.jit
def _store_state(state_ptr, index, kv_a, kv_b, km_a, km_b, HALF: tl.constexpr, DV: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Store row halves of ``kv`` (or its gradient) and of the key sum (or its gradient) as state row ``index``."""
    kv, km, mask, mask_p = _state_pointers(state_ptr, index, HALF, DV, BLOCK_HALF, BLOCK_DV)
    tl.store(kv, kv_a, mask=mask)
    tl.store(kv + HALF * DV, kv_b, mask=mask)
    tl.store(km, km_a, mask=mask_p)
    tl.store(km + HALF, km_b, mask=mask_p)


@triton.jit
def _kv_kernel(
    qk_ptr, v_ptr, cos_ptr, sin_ptr, state_ptr,
    N, H, W, tokens_per_program,
    s_qb, s_qn, s_qk, s_qh, s_vb, s_vn, s_vh, s_vd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr, SEPARABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    c = tl.arange(0, BLOCK_DV)
    k_base = qk_ptr + b * s_qb + s_qk + h * s_qh
    v_base = v_ptr + b * s_vb + h * s_vh
    kv_a = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    kv_b = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    sum_a = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = chunk * tokens_per_program
    for i in range(0, tokens_per_program, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        mask_n = n < N
        fa, fb, ra, rb, cs, sn = _features(k_base, n, mask_n, s_qn, h, cos_ptr, sin_ptr, s_th, s_tn, H, W,
                                              HALF, BLOCK_N, BLOCK_HALF, SEPARABLE)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * s_vn + c[None, :] * s_vd,
                    mask=mask_n[:, None] & (c < DV)[None, :], other=0.0)
        v = v.to(DOT_DTYPE)
        kv_a = tl.dot(tl.trans(ra.to(DOT_DTYPE)), v, kv_a, input_precision=PRECISION)
        kv_b = tl.dot(tl.trans(rb.to(DOT_DTYPE)), v, kv_b, input_precision=PRECISION)
        sum_a += tl.sum(fa, axis=0)
        sum_b += tl.sum(fb, axis=0)
    _store_state(state_ptr, bh * tl.num_programs(1) + chunk, kv_a, kv_b, sum_a, sum_b, HALF, DV, BLOCK_HALF, BLOCK_DV)


@triton.jit
def _out_kernel(
    qk_ptr, cos_ptr, sin_ptr, state_ptr, out_ptr,
    N, H, W, inv_n, eps,
    s_qb, s_qn, s_qh, s_ob, s_on, s_oh, s_od, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr, SEPARABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    c = tl.arange(0, BLOCK_DV)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    fa, fb, ra, rb, cs, sn = _features(qk_ptr + b * s_qb + h * s_qh, n, mask_n, s_qn, h, cos_ptr, sin_ptr, s_th,
                                          s_tn, H, W, HALF, BLOCK_N, BLOCK_HALF, SEPARABLE)
    kv_a, kv_b, km_a, km_b = _load_state(state_ptr, bh, inv_n, HALF, DV, BLOCK_HALF, BLOCK_DV, DOT_DTYPE)
    z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
    o = tl.dot(ra.to(DOT_DTYPE), kv_a, input_precision=PRECISION)
    o = tl.dot(rb.to(DOT_DTYPE), kv_b, o, input_precision=PRECISION) * z[:, None]
    out = out_ptr + b * s_ob + h * s_oh + n.to(tl.int64)[:, None] * s_on + c[None, :] * s_od
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (c < DV)[None, :])


@triton.jit
def _bwd_q_kernel(
    qk_ptr, cos_ptr, sin_ptr, state_ptr, do_ptr, dqk_ptr, dstate_ptr,
    N, H, W, tokens_per_program, inv_n, eps,
    s_qb, s_qn, s_qh, s_gb, s_gn, s_gh, s_db, s_dn, s_dh, s_dd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr, SEPARABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    c = tl.arange(0, BLOCK_DV)
    q_base = qk_ptr + b * s_qb + h * s_qh
    kv_a, kv_b, km_a, km_b = _load_state(state_ptr, bh, inv_n, HALF, DV, BLOCK_HALF, BLOCK_DV, DOT_DTYPE)
    dkv_a = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkv_b = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkm_a = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    dkm_b = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = chunk * tokens_per_program
    for i in range(0, tokens_per_program, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        mask_n = n < N
        fa, fb, ra, rb, cs, sn = _features(q_base, n, mask_n, s_qn, h, cos_ptr, sin_ptr, s_th, s_tn, H, W,
                                              HALF, BLOCK_N, BLOCK_HALF, SEPARABLE)
        ra, rb = ra.to(DOT_DTYPE), rb.to(DOT_DTYPE)
        z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
        do = tl.load(do_ptr + b * s_db + h * s_dh + n.to(tl.int64)[:, None] * s_dn + c[None, :] * s_dd,
                     mask=mask_n[:, None] & (c < DV)[None, :], other=0.0).to(tl.float32)
        u = tl.dot(ra, kv_a, input_precision=PRECISION)
        u = tl.dot(rb, kv_b, u, input_precision=PRECISION)  # (R phi(q)) kv, before the normaliser
        ds = -tl.sum(do * u, axis=1) * z * z  # gradient of the normaliser's denominator
        du = (do * z[:, None]).to(DOT_DTYPE)
        dkv_a = tl.dot(tl.trans(ra), du, dkv_a, input_precision=PRECISION)
        dkv_b = tl.dot(tl.trans(rb), du, dkv_b, input_precision=PRECISION)
        dkm_a += tl.sum(ds[:, None] * fa, axis=0)
        dkm_b += tl.sum(ds[:, None] * fb, axis=0)
        dra = tl.dot(du, tl.trans(kv_a), input_precision=PRECISION)
        drb = tl.dot(du, tl.trans(kv_b), input_precision=PRECISION)
        dfa = dra * cs + drb * sn + ds[:, None] * km_a[None, :]  # transposed rotation, plus the normaliser's part
        dfb = drb * cs - dra * sn + ds[:, None] * km_b[None, :]
        _store_pairs(dqk_ptr + b * s_gb + h * s_gh, n, mask_n, s_gn,
                     dfa * tl.minimum(fa, 1.0), dfb * tl.minimum(fb, 1.0), HALF, BLOCK_N, BLOCK_HALF)  # ELU+1's derivative: min(phi, 1)
    _store_state(dstate_ptr, bh * tl.num_programs(1) + chunk, dkv_a, dkv_b, dkm_a, dkm_b, HALF, DV, BLOCK_HALF, BLOCK_DV)


@triton.jit
def _bwd_kv_kernel(
    qk_ptr, v_ptr, cos_ptr, sin_ptr, dstate_ptr, dqk_ptr, dv_ptr,
    N, H, W, inv_n,
    s_qb, s_qn, s_qk, s_qh, s_vb, s_vn, s_vh, s_vd, s_gb, s_gn, s_gk, s_gh,
    s_wb, s_wn, s_wh, s_wd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr, SEPARABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dstate_ptr``: gradients of the sums of ``kr^T v`` and of ``phi(k)``'s mean, not yet divided by N."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    c = tl.arange(0, BLOCK_DV)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_v = mask_n[:, None] & (c < DV)[None, :]
    k_base = qk_ptr + b * s_qb + s_qk + h * s_qh
    fa, fb, ra, rb, cs, sn = _features(k_base, n, mask_n, s_qn, h, cos_ptr, sin_ptr, s_th, s_tn, H, W,
                                          HALF, BLOCK_N, BLOCK_HALF, SEPARABLE)
    rows = n.to(tl.int64)[:, None]
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows * s_vn + c[None, :] * s_vd, mask=mask_v, other=0.0).to(DOT_DTYPE)
    dkv_a, dkv_b, dkm_a, dkm_b = _load_state(dstate_ptr, bh, inv_n, HALF, DV, BLOCK_HALF, BLOCK_DV, DOT_DTYPE)
    dra = tl.dot(v, tl.trans(dkv_a), input_precision=PRECISION)
    drb = tl.dot(v, tl.trans(dkv_b), input_precision=PRECISION)
    dv = tl.dot(ra.to(DOT_DTYPE), dkv_a, input_precision=PRECISION)
    dv = tl.dot(rb.to(DOT_DTYPE), dkv_b, dv, input_precision=PRECISION)
    dfa = dra * cs + drb * sn + dkm_a[None, :]
    dfb = drb * cs - dra * sn + dkm_b[None, :]
    _store_pairs(dqk_ptr + b * s_gb + s_gk + h * s_gh, n, mask_n, s_gn,
                 dfa * tl.minimum(fa, 1.0), dfb * tl.minimum(fb, 1.0), HALF, BLOCK_N, BLOCK_HALF)
    dv_out = dv_ptr + b * s_wb + h * s_wh + rows * s_wn + c[None, :] * s_wd
    tl.store(dv_out, dv.to(dv_ptr.dtype.element_ty), mask=mask_v)


# Launch settings: tokens per block of the reduction passes (which loop over their chunk) and of
# the token-block passes (one block per program: larger blocks read the d x d state less often).
# Under the interpreter every program runs in numpy: small blocks keep tests quick.
BLOCK_N_GPU, TOKEN_BLOCK_N_GPU, BLOCK_N_INTERPRETED, NUM_WARPS = 64, 128, 16, 4
# Reduction passes: enough chunks of tokens per (batch, head) for this many programs per SM.
PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=256)
def _config(B: int, N: int, H: int, d: int, dtype: torch.dtype, device: torch.device, tf32: bool, interp: bool,
            token_block_n: int) -> dict:
    """Launch settings of one problem shape (cached: they cost Python time at every call otherwise)."""
    if dtype == torch.float32:
        dot_dtype, precision = tl.float32, ("tf32" if tf32 else "ieee")
    else:
        dot_dtype = tl.float32 if interp and dtype == torch.bfloat16 else getattr(tl, str(dtype).removeprefix("torch."))
        precision = None
    block_n = BLOCK_N_INTERPRETED if interp else BLOCK_N_GPU
    token_block_n = BLOCK_N_INTERPRETED if interp else token_block_n
    blocks = triton.cdiv(N, block_n)
    if interp:
        chunks = min(blocks, 2)  # two chunks where possible: the tests cover the partial sums
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        chunks = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * sms, B * H)))
    tokens_per_program = triton.cdiv(blocks, chunks) * block_n
    chunks = triton.cdiv(N, tokens_per_program)
    shared = dict(HALF=d // 2, DV=d, BLOCK_HALF=max(16, triton.next_power_of_2(d // 2)),
                  BLOCK_DV=max(16, triton.next_power_of_2(d)), DOT_DTYPE=dot_dtype, PRECISION=precision)
    if not interp:
        shared["num_warps"] = NUM_WARPS
    return dict(chunks=chunks, tokens_per_program=tokens_per_program, token_blocks=triton.cdiv(N, token_block_n),
                reduce=dict(shared, BLOCK_N=block_n), tokens=dict(shared, BLOCK_N=token_block_n))


def _settings(qk: torch.Tensor) -> dict:
    B, N, _, H, d = qk.shape
    return _config(B, N, H, d, qk.dtype, qk.device, torch.backends.cuda.matmul.allow_tf32, interpreted(), TOKEN_BLOCK_N_GPU)


def _sum_chunks(parts: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(B h chunks, S) -> (B h, S)``: the chunks' partial sums added (``parts`` itself for one chunk)."""
    return parts if chunks == 1 else parts.view(-1, chunks, parts.shape[-1]).sum(1)


def state_size(d: int) -> int:
    """Floats of the state per (batch, head): ``kr^T v`` (``d x d``) and the key sum (``d``)."""
    return d * d + d


def forward(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk: (B, N, 2, h, d)`` (channels contiguous), ``v: (B, N, h, d)``, ``cos, sin: (h, N, d/2)``
    (float32, same strides), ``width``: the grid's width for separable tables (0: read every row)
    -> ``out (B, N, h, d)`` (dtype of ``qk``) and the state ``(B h, d d + d)`` (float32 sums, rows
    de-interleaved: see the module docstring)."""
    B, N, _, H, d = qk.shape
    cfg = _settings(qk)
    chunks = cfg["chunks"]
    parts = qk.new_empty((B * H * chunks, state_size(d)), dtype=torch.float32)
    s_q, s_v, s_t = qk.stride(), v.stride(), cos.stride()
    _kv_kernel[(B * H, chunks)](
        qk, v, cos, sin, parts, N, H, width, cfg["tokens_per_program"],
        s_q[0], s_q[1], s_q[2], s_q[3], *s_v, s_t[0], s_t[1], SEPARABLE=width > 0, **cfg["reduce"],
    )
    state = _sum_chunks(parts, chunks)
    out = qk.new_empty((B, N, H, d))
    _out_kernel[(cfg["token_blocks"], B * H)](
        qk, cos, sin, state, out, N, H, width, 1.0 / N, eps,
        s_q[0], s_q[1], s_q[3], *out.stride(), s_t[0], s_t[1], SEPARABLE=width > 0, **cfg["tokens"],
    )
    return out, state


def backward(
    grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    state: torch.Tensor, eps: float, width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dqk, dv)`` of :func:`forward`'s ``out`` given ``grad_out (B, N, h, d)``."""
    B, N, _, H, d = qk.shape
    cfg = _settings(qk)
    chunks = cfg["chunks"]
    dqk = torch.empty_like(qk, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dparts = qk.new_empty((B * H * chunks, state_size(d)), dtype=torch.float32)
    s_q, s_g, s_t = qk.stride(), dqk.stride(), cos.stride()
    _bwd_q_kernel[(B * H, chunks)](
        qk, cos, sin, state, grad_out, dqk, dparts, N, H, width, cfg["tokens_per_program"], 1.0 / N, eps,
        s_q[0], s_q[1], s_q[3], s_g[0], s_g[1], s_g[3], *grad_out.stride(), s_t[0], s_t[1],
        SEPARABLE=width > 0, **cfg["reduce"],
    )
    dstate = _sum_chunks(dparts, chunks)
    _bwd_kv_kernel[(cfg["token_blocks"], B * H)](
        qk, v, cos, sin, dstate, dqk, dv, N, H, width, 1.0 / N,
        s_q[0], s_q[1], s_q[2], s_q[3], *v.stride(), s_g[0], s_g[1], s_g[2], s_g[3], *dv.stride(), s_t[0], s_t[1],
        SEPARABLE=width > 0, **cfg["tokens"],
    )
    return dqk, dv
