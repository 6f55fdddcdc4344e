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

__all__ = ["backward", "forward", "interpreted"]

def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


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
    mask_p = p < HALF
    mask_c = c < DV
    k_base = qk_ptr + b * s_qb + s_qk + h * s_qh
    v_base = v_ptr + b * s_vb + h * s_vh
    t_base = h * s_th
    kv_a = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    kv_b = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    sum_a = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = chunk * tokens_per_program
    for i in range(0, tokens_per_program, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        mask_n = n < N
        rows = n.to(tl.int64)[:, None]
        m = mask_n[:, None] & mask_p[None, :]
        ka = tl.load(k_base + rows * s_qn + (2 * p)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        kb = tl.load(k_base + rows * s_qn + (2 * p + 1)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        fa = tl.where(m, tl.exp(tl.minimum(ka, 0.0)) + tl.maximum(ka, 0.0), 0.0)
        fb = tl.where(m, tl.exp(tl.minimum(kb, 0.0)) + tl.maximum(kb, 0.0), 0.0)
        cs = tl.load(cos_ptr + t_base + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + t_base + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
        ra = (fa * cs - fb * sn).to(DOT_DTYPE)
        rb = (fa * sn + fb * cs).to(DOT_DTYPE)
        v = tl.load(v_base + rows * s_vn + c[None, :] * s_vd, mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        v = v.to(DOT_DTYPE)
        kv_a = tl.dot(tl.trans(ra), v, kv_a, input_precision=PRECISION)
        kv_b = tl.dot(tl.trans(rb), v, kv_b, input_precision=PRECISION)
        sum_a += tl.sum(fa, axis=0)
        sum_b += tl.sum(fb, axis=0)
    part = (bh * tl.num_programs(1) + chunk).to(tl.int64)
    kv_out = kv_ptr + part * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    mask_kv = mask_p[:, None] & mask_c[None, :]
    tl.store(kv_out, kv_a, mask=mask_kv)
    tl.store(kv_out + HALF * DV, kv_b, mask=mask_kv)
    tl.store(ksum_ptr + part * (2 * HALF) + p, sum_a, mask=mask_p)
    tl.store(ksum_ptr + part * (2 * HALF) + HALF + p, sum_b, mask=mask_p)


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
    mask_p = p < HALF
    mask_c = c < DV
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    rows = n.to(tl.int64)[:, None]
    m = mask_n[:, None] & mask_p[None, :]
    q_base = qk_ptr + b * s_qb + h * s_qh + rows * s_qn
    qa = tl.load(q_base + (2 * p)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
    qb = tl.load(q_base + (2 * p + 1)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
    fa = tl.where(m, tl.exp(tl.minimum(qa, 0.0)) + tl.maximum(qa, 0.0), 0.0)
    fb = tl.where(m, tl.exp(tl.minimum(qb, 0.0)) + tl.maximum(qb, 0.0), 0.0)
    km = kmean_ptr + bh.to(tl.int64) * (2 * HALF) + p
    km_a = tl.load(km, mask=mask_p, other=0.0)
    km_b = tl.load(km + HALF, mask=mask_p, other=0.0)
    z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
    t = cos_ptr + h * s_th + rows * s_tn + p[None, :]
    cs = tl.load(t, mask=m, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + h * s_th + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
    ra = (fa * cs - fb * sn).to(DOT_DTYPE)
    rb = (fa * sn + fb * cs).to(DOT_DTYPE)
    kv = kv_ptr + bh.to(tl.int64) * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    mask_kv = mask_p[:, None] & mask_c[None, :]
    kv_a = tl.load(kv, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    kv_b = tl.load(kv + HALF * DV, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    o = tl.dot(ra, kv_a, input_precision=PRECISION)
    o = tl.dot(rb, kv_b, o, input_precision=PRECISION) * z[:, None]
    out = out_ptr + b * s_ob + h * s_oh + rows * s_on + c[None, :] * s_od
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


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
    mask_p = p < HALF
    mask_c = c < DV
    mask_kv = mask_p[:, None] & mask_c[None, :]
    kv = kv_ptr + bh.to(tl.int64) * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    kv_a = tl.load(kv, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    kv_b = tl.load(kv + HALF * DV, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    km = kmean_ptr + bh.to(tl.int64) * (2 * HALF) + p
    km_a = tl.load(km, mask=mask_p, other=0.0)
    km_b = tl.load(km + HALF, mask=mask_p, other=0.0)
    dkv_a = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkv_b = tl.zeros((BLOCK_HALF, BLOCK_DV), dtype=tl.float32)
    dkm_a = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    dkm_b = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = chunk * tokens_per_program
    for i in range(0, tokens_per_program, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        mask_n = n < N
        rows = n.to(tl.int64)[:, None]
        m = mask_n[:, None] & mask_p[None, :]
        q_base = qk_ptr + b * s_qb + h * s_qh + rows * s_qn
        qa = tl.load(q_base + (2 * p)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        qb = tl.load(q_base + (2 * p + 1)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        fa = tl.where(m, tl.exp(tl.minimum(qa, 0.0)) + tl.maximum(qa, 0.0), 0.0)
        fb = tl.where(m, tl.exp(tl.minimum(qb, 0.0)) + tl.maximum(qb, 0.0), 0.0)
        z = 1.0 / (tl.sum(fa * km_a[None, :], axis=1) + tl.sum(fb * km_b[None, :], axis=1) + eps)
        cs = tl.load(cos_ptr + h * s_th + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + h * s_th + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
        ra = (fa * cs - fb * sn).to(DOT_DTYPE)
        rb = (fa * sn + fb * cs).to(DOT_DTYPE)
        mask_o = mask_n[:, None] & mask_c[None, :]
        do = tl.load(do_ptr + b * s_db + h * s_dh + rows * s_dn + c[None, :] * s_dd, mask=mask_o, other=0.0)
        do = do.to(tl.float32)
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
        dfa = dra * cs + drb * sn + ds[:, None] * km_a[None, :]
        dfb = drb * cs - dra * sn + ds[:, None] * km_b[None, :]
        g_base = dqk_ptr + b * s_gb + h * s_gh + rows * s_gn
        tl.store(g_base + (2 * p)[None, :] * s_gd, (dfa * tl.minimum(fa, 1.0)).to(dqk_ptr.dtype.element_ty), mask=m)
        tl.store(g_base + (2 * p + 1)[None, :] * s_gd, (dfb * tl.minimum(fb, 1.0)).to(dqk_ptr.dtype.element_ty), mask=m)
    part = (bh * tl.num_programs(1) + chunk).to(tl.int64)
    out = dkv_ptr + part * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    tl.store(out, dkv_a, mask=mask_kv)
    tl.store(out + HALF * DV, dkv_b, mask=mask_kv)
    tl.store(dkmean_ptr + part * (2 * HALF) + p, dkm_a, mask=mask_p)
    tl.store(dkmean_ptr + part * (2 * HALF) + HALF + p, dkm_b, mask=mask_p)


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
    mask_p = p < HALF
    mask_c = c < DV
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    rows = n.to(tl.int64)[:, None]
    m = mask_n[:, None] & mask_p[None, :]
    mask_v = mask_n[:, None] & mask_c[None, :]
    k_base = qk_ptr + b * s_qb + s_qk + h * s_qh + rows * s_qn
    ka = tl.load(k_base + (2 * p)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
    kb = tl.load(k_base + (2 * p + 1)[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
    fa = tl.where(m, tl.exp(tl.minimum(ka, 0.0)) + tl.maximum(ka, 0.0), 0.0)
    fb = tl.where(m, tl.exp(tl.minimum(kb, 0.0)) + tl.maximum(kb, 0.0), 0.0)
    cs = tl.load(cos_ptr + h * s_th + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + h * s_th + rows * s_tn + p[None, :], mask=m, other=0.0).to(tl.float32)
    ra = (fa * cs - fb * sn).to(DOT_DTYPE)
    rb = (fa * sn + fb * cs).to(DOT_DTYPE)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows * s_vn + c[None, :] * s_vd, mask=mask_v, other=0.0)
    v = v.to(DOT_DTYPE)
    mask_kv = mask_p[:, None] & mask_c[None, :]
    g = dkv_ptr + bh.to(tl.int64) * (2 * HALF * DV) + p[:, None] * DV + c[None, :]
    dkv_a = tl.load(g, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    dkv_b = tl.load(g + HALF * DV, mask=mask_kv, other=0.0).to(DOT_DTYPE)
    km = dkmean_ptr + bh.to(tl.int64) * (2 * HALF) + p
    dkm_a = tl.load(km, mask=mask_p, other=0.0)
    dkm_b = tl.load(km + HALF, mask=mask_p, other=0.0)
    dra = tl.dot(v, tl.trans(dkv_a), input_precision=PRECISION)
    drb = tl.dot(v, tl.trans(dkv_b), input_precision=PRECISION)
    dv = tl.dot(ra, dkv_a, input_precision=PRECISION)
    dv = tl.dot(rb, dkv_b, dv, input_precision=PRECISION)
    dfa = dra * cs + drb * sn + dkm_a[None, :]
    dfb = drb * cs - dra * sn + dkm_b[None, :]
    g_base = dqk_ptr + b * s_gb + s_gk + h * s_gh + rows * s_gn
    tl.store(g_base + (2 * p)[None, :] * s_gd, (dfa * tl.minimum(fa, 1.0)).to(dqk_ptr.dtype.element_ty), mask=m)
    tl.store(g_base + (2 * p + 1)[None, :] * s_gd, (dfb * tl.minimum(fb, 1.0)).to(dqk_ptr.dtype.element_ty), mask=m)
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
