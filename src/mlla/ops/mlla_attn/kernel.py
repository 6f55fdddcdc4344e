"""Triton kernels of MLLA's attention: feature map, RoPE, ``kv``, normaliser and output fused.

Per (batch, head) the forward reads the tokens twice and the backward twice:

* forward pass 1 (:func:`_kv_kernel`), grid (batch x heads, token chunks): ``kr = R phi(k)``,
  partial sums of ``kr^T v`` (``d x d``) and of ``phi(k)`` per chunk;
  the chunks' partials are summed in float32 (a deterministic reduction, no atomics);
* forward pass 2 (:func:`_out_kernel`), grid (token blocks, batch x heads):
  ``out = (R phi(q)) kv / (phi(q) . mean(phi(k)) + eps)``;
* backward pass 1 (:func:`_bwd_q_kernel`), grid (batch x heads, token chunks): ``dq`` and the
  chunks' partial gradients of ``kv`` and of ``mean(phi(k))``;
* backward pass 2 (:func:`_bwd_kv_kernel`), grid (token blocks, batch x heads): ``dk`` and ``dv``.

Nothing of size ``N`` is saved between forward and backward beyond the inputs: ``kv`` and the key
mean are ``d x d`` and ``d`` per head. Each head's channel pairs ``(a_p, b_p) = (x_{2p},
x_{2p+1})`` are read as two halves, so the rotation ``(a cos - b sin, a sin + b cos)`` and its
transpose need no shuffles; ``kv`` and the key mean are kept with rows in that order
(``[a_0 .. a_{d/2-1}, b_0 .. b_{d/2-1}]``), which changes no dot product.

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
def _features(base, rows, p, m, s_n, s_d, cos_ptr, sin_ptr, t_off, s_tn):
    """q or k of token ``rows`` at ``base`` as pair halves ``(a, b)``: ``phi(a), phi(b)`` (ELU+1,
    0 where masked), their RoPE rotation ``(a cos - b sin, a sin + b cos)``, and ``cos, sin``."""
    xa = tl.load(base + rows * s_n + (2 * p)[None, :] * s_d, mask=m, other=0.0).to(tl.float32)
    xb = tl.load(base + rows * s_n + (2 * p + 1)[None, :] * s_d, mask=m, other=0.0).to(tl.float32)
    fa = tl.where(m, tl.exp(tl.minimum(xa, 0.0)) + tl.maximum(xa, 0.0), 0.0)
    fb = tl.where(m, tl.exp(tl.minimum(xb, 0.0)) + tl.maximum(xb, 0.0), 0.0)
    cs = tl.load(cos_ptr + t_off + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + t_off + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
    return fa, fb, fa * cs - fb * sn, fa * sn + fb * cs, cs, sn


@triton.jit
def _store_pairs(base, rows, p, m, s_n, s_d, ga, gb):
    """Store the pair halves ``ga, gb`` at channels ``2p`` and ``2p + 1`` of token ``rows``."""
    tl.store(base + rows * s_n + (2 * p)[None, :] * s_d, ga.to(base.dtype.element_ty), mask=m)
    tl.store(base + rows * s_n + (2 * p + 1)[None, :] * s_d, gb.to(base.dtype.element_ty), mask=m)


@triton.jit
def _load_state(kv_ptr, kmean_ptr, index, p, c, HALF: tl.constexpr, DV: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Row halves of ``kv`` (or its gradient) ``(d, d)`` and of the key mean ``(d)`` number ``index``."""
    mask_p = p < HALF
    mask = mask_p[:, None] & (c < DV)[None, :]
    kv = kv_ptr + index.to(tl.int64) * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    km = kmean_ptr + index.to(tl.int64) * (2 * HALF) + p
    kv_a = tl.load(kv, mask=mask, other=0.0).to(DOT_DTYPE)
    kv_b = tl.load(kv + HALF * DV, mask=mask, other=0.0).to(DOT_DTYPE)
    return kv_a, kv_b, tl.load(km, mask=mask_p, other=0.0), tl.load(km + HALF, mask=mask_p, other=0.0)


@triton.jit
def _store_state(kv_ptr, kmean_ptr, index, p, c, kv_a, kv_b, km_a, km_b, HALF: tl.constexpr, DV: tl.constexpr):
    """Store row halves of ``kv`` (or its gradient) and of the key mean (or its gradient) as number ``index``."""
    mask_p = p < HALF
    mask = mask_p[:, None] & (c < DV)[None, :]
    kv = kv_ptr + index.to(tl.int64) * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    km = kmean_ptr + index.to(tl.int64) * (2 * HALF) + p
    tl.store(kv, kv_a, mask=mask)
    tl.store(kv + HALF * DV, kv_b, mask=mask)
    tl.store(km, km_a, mask=mask_p)
    tl.store(km + HALF, km_b, mask=mask_p)


@triton.jit
def _kv_kernel(
    qk_ptr, v_ptr, cos_ptr, sin_ptr, kv_ptr, ksum_ptr,
    N, H, tokens_per_program,
    s_qb, s_qn, s_qk, s_qh, s_qd, s_vb, s_vn, s_vh, s_vd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = tl.arange(0, BLOCK_HALF)
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
        rows = n.to(tl.int64)[:, None]
        m = mask_n[:, None] & (p < HALF)[None, :]
        fa, fb, ra, rb, cs, sn = _features(k_base, rows, p, m, s_qn, s_qd, cos_ptr, sin_ptr, h * s_th, s_tn)
        v = tl.load(v_base + rows * s_vn + c[None, :] * s_vd, mask=mask_n[:, None] & (c < DV)[None, :], other=0.0)
        v = v.to(DOT_DTYPE)
        kv_a = tl.dot(tl.trans(ra.to(DOT_DTYPE)), v, kv_a, input_precision=PRECISION)
        kv_b = tl.dot(tl.trans(rb.to(DOT_DTYPE)), v, kv_b, input_precision=PRECISION)
        sum_a += tl.sum(fa, axis=0)
        sum_b += tl.sum(fb, axis=0)
    _store_state(kv_ptr, ksum_ptr, bh * tl.num_programs(1) + chunk, p, c, kv_a, kv_b, sum_a, sum_b, HALF, DV)


@triton.jit
def _out_kernel(
    qk_ptr, cos_ptr, sin_ptr, kv_ptr, kmean_ptr, out_ptr,
    N, H, eps,
    s_qb, s_qn, s_qh, s_qd, s_ob, s_on, s_oh, s_od, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = tl.arange(0, BLOCK_HALF)
    c = tl.arange(0, BLOCK_DV)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    rows = n.to(tl.int64)[:, None]
    m = mask_n[:, None] & (p < HALF)[None, :]
    fa, fb, ra, rb, cs, sn = _features(qk_ptr + b * s_qb + h * s_qh, rows, p, m, s_qn, s_qd, cos_ptr, sin_ptr, h * s_th, s_tn)
    kv_a, kv_b, km_a, km_b = _load_state(kv_ptr, kmean_ptr, bh, p, c, HALF, DV, DOT_DTYPE)
    z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
    o = tl.dot(ra.to(DOT_DTYPE), kv_a, input_precision=PRECISION)
    o = tl.dot(rb.to(DOT_DTYPE), kv_b, o, input_precision=PRECISION) * z[:, None]
    out = out_ptr + b * s_ob + h * s_oh + rows * s_on + c[None, :] * s_od
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (c < DV)[None, :])


@triton.jit
def _bwd_q_kernel(
    qk_ptr, cos_ptr, sin_ptr, kv_ptr, kmean_ptr, do_ptr, dqk_ptr, dkv_ptr, dkmean_ptr,
    N, H, tokens_per_program, eps,
    s_qb, s_qn, s_qh, s_qd, s_gb, s_gn, s_gh, s_gd, s_db, s_dn, s_dh, s_dd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = tl.arange(0, BLOCK_HALF)
    c = tl.arange(0, BLOCK_DV)
    q_base = qk_ptr + b * s_qb + h * s_qh
    kv_a, kv_b, km_a, km_b = _load_state(kv_ptr, kmean_ptr, bh, p, c, HALF, DV, DOT_DTYPE)
    dkv_a = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkv_b = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkm_a = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    dkm_b = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = chunk * tokens_per_program
    for i in range(0, tokens_per_program, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        mask_n = n < N
        rows = n.to(tl.int64)[:, None]
        m = mask_n[:, None] & (p < HALF)[None, :]
        fa, fb, ra, rb, cs, sn = _features(q_base, rows, p, m, s_qn, s_qd, cos_ptr, sin_ptr, h * s_th, s_tn)
        ra, rb = ra.to(DOT_DTYPE), rb.to(DOT_DTYPE)
        z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
        do = tl.load(do_ptr + b * s_db + h * s_dh + rows * s_dn + c[None, :] * s_dd,
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
        _store_pairs(dqk_ptr + b * s_gb + h * s_gh, rows, p, m, s_gn, s_gd,
                     dfa * tl.minimum(fa, 1.0), dfb * tl.minimum(fb, 1.0))  # ELU+1's derivative: min(phi, 1)
    _store_state(dkv_ptr, dkmean_ptr, bh * tl.num_programs(1) + chunk, p, c, dkv_a, dkv_b, dkm_a, dkm_b, HALF, DV)


@triton.jit
def _bwd_kv_kernel(
    qk_ptr, v_ptr, cos_ptr, sin_ptr, dkv_ptr, dkmean_ptr, dqk_ptr, dv_ptr,
    N, H,
    s_qb, s_qn, s_qk, s_qh, s_qd, s_vb, s_vn, s_vh, s_vd, s_gb, s_gn, s_gk, s_gh, s_gd,
    s_wb, s_wn, s_wh, s_wd, s_th, s_tn,
    HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dkv_ptr``, ``dkmean_ptr``: gradients of ``kv`` and of the key mean, already divided by N."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = tl.arange(0, BLOCK_HALF)
    c = tl.arange(0, BLOCK_DV)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    rows = n.to(tl.int64)[:, None]
    m = mask_n[:, None] & (p < HALF)[None, :]
    mask_v = mask_n[:, None] & (c < DV)[None, :]
    k_base = qk_ptr + b * s_qb + s_qk + h * s_qh
    fa, fb, ra, rb, cs, sn = _features(k_base, rows, p, m, s_qn, s_qd, cos_ptr, sin_ptr, h * s_th, s_tn)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows * s_vn + c[None, :] * s_vd, mask=mask_v, other=0.0).to(DOT_DTYPE)
    dkv_a, dkv_b, dkm_a, dkm_b = _load_state(dkv_ptr, dkmean_ptr, bh, p, c, HALF, DV, DOT_DTYPE)
    dra = tl.dot(v, tl.trans(dkv_a), input_precision=PRECISION)
    drb = tl.dot(v, tl.trans(dkv_b), input_precision=PRECISION)
    dv = tl.dot(ra.to(DOT_DTYPE), dkv_a, input_precision=PRECISION)
    dv = tl.dot(rb.to(DOT_DTYPE), dkv_b, dv, input_precision=PRECISION)
    dfa = dra * cs + drb * sn + dkm_a[None, :]
    dfb = drb * cs - dra * sn + dkm_b[None, :]
    _store_pairs(dqk_ptr + b * s_gb + s_gk + h * s_gh, rows, p, m, s_gn, s_gd,
                 dfa * tl.minimum(fa, 1.0), dfb * tl.minimum(fb, 1.0))
    dv_out = dv_ptr + b * s_wb + h * s_wh + rows * s_wn + c[None, :] * s_wd
    tl.store(dv_out, dv.to(dv_ptr.dtype.element_ty), mask=mask_v)


# Launch settings. Under the interpreter every program runs in numpy: small blocks keep tests quick.
BLOCK_N_GPU, BLOCK_N_INTERPRETED, NUM_WARPS = 64, 16, 4
# Reduction passes: enough chunks of tokens per (batch, head) for this many programs per SM.
PROGRAMS_PER_SM = 4


def _config(qk: torch.Tensor) -> dict:
    B, N, _, H, d = qk.shape
    interp = interpreted()
    if qk.dtype == torch.float32:
        dot_dtype, precision = tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    else:
        dot_dtype = tl.float32 if interp and qk.dtype == torch.bfloat16 else getattr(tl, str(qk.dtype).removeprefix("torch."))
        precision = None
    block_n = BLOCK_N_INTERPRETED if interp else BLOCK_N_GPU
    blocks = triton.cdiv(N, block_n)
    if interp:
        chunks = min(blocks, 2)  # two chunks where possible: the tests cover the partial sums
    else:
        sms = torch.cuda.get_device_properties(qk.device).multi_processor_count
        chunks = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * sms, B * H)))
    tokens_per_program = triton.cdiv(blocks, chunks) * block_n
    chunks = triton.cdiv(N, tokens_per_program)
    consts = dict(
        HALF=d // 2, DV=d, BLOCK_N=block_n, BLOCK_HALF=max(16, triton.next_power_of_2(d // 2)),
        BLOCK_DV=max(16, triton.next_power_of_2(d)), DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    if not interp:
        consts["num_warps"] = NUM_WARPS
    return dict(chunks=chunks, tokens_per_program=tokens_per_program, blocks=blocks, consts=consts)


def forward(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qk: (B, N, 2, h, d)``, ``v: (B, N, h, d)``, ``cos, sin: (h, N, d/2)`` (float32, same strides)
    -> ``out (B, N, h, d)`` (dtype of ``qk``), ``kv (B h, d, d)`` and the key mean ``(B h, d)``
    (float32, rows de-interleaved: see the module docstring)."""
    B, N, _, H, d = qk.shape
    cfg = _config(qk)
    chunks, consts = cfg["chunks"], cfg["consts"]
    kv_parts = qk.new_empty((B * H, chunks, d, d), dtype=torch.float32)
    ksum_parts = qk.new_empty((B * H, chunks, d), dtype=torch.float32)
    _kv_kernel[(B * H, chunks)](
        qk, v, cos, sin, kv_parts, ksum_parts, N, H, cfg["tokens_per_program"],
        *qk.stride(), *v.stride(), *cos.stride()[:2], **consts,
    )
    kv, kmean = kv_parts.sum(1) / N, ksum_parts.sum(1) / N
    out = qk.new_empty((B, N, H, d))
    s_q = qk.stride()
    _out_kernel[(cfg["blocks"], B * H)](
        qk, cos, sin, kv, kmean, out, N, H, eps,
        s_q[0], s_q[1], s_q[3], s_q[4], *out.stride(), *cos.stride()[:2], **consts,
    )
    return out, kv, kmean


def backward(
    grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    kv: torch.Tensor, kmean: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dqk, dv)`` of :func:`forward`'s ``out`` given ``grad_out (B, N, h, d)``."""
    B, N, _, H, d = qk.shape
    cfg = _config(qk)
    chunks, consts = cfg["chunks"], cfg["consts"]
    dqk = torch.empty_like(qk, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dkv_parts = qk.new_empty((B * H, chunks, d, d), dtype=torch.float32)
    dkmean_parts = qk.new_empty((B * H, chunks, d), dtype=torch.float32)
    s_q, s_g = qk.stride(), dqk.stride()
    _bwd_q_kernel[(B * H, chunks)](
        qk, cos, sin, kv, kmean, grad_out, dqk, dkv_parts, dkmean_parts, N, H, cfg["tokens_per_program"], eps,
        s_q[0], s_q[1], s_q[3], s_q[4], s_g[0], s_g[1], s_g[3], s_g[4], *grad_out.stride(), *cos.stride()[:2],
        **consts,
    )
    dkv, dkmean = dkv_parts.sum(1) / N, dkmean_parts.sum(1) / N
    _bwd_kv_kernel[(cfg["blocks"], B * H)](
        qk, v, cos, sin, dkv, dkmean, dqk, dv, N, H,
        *qk.stride(), *v.stride(), *dqk.stride(), *dv.stride(), *cos.stride()[:2], **consts,
    )
    return dqk, dv
