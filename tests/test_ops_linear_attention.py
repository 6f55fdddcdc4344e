"""The unified gated linear attention operator: its three modes agree with the references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mlla.ops.linear_attention as linear_attention
from mlla.ops import feature_map, gated_linear_attention, rope_2d_tables
from mlla.ops.naive import linear_attention_quadratic
from mlla.ops.rope import apply_rope_2d

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def _inputs(B=2, N=37, H=3, K=4, V=5, dtype=torch.float64, decay="key"):
    q, k = torch.randn(B, N, H, K, dtype=dtype), torch.randn(B, N, H, K, dtype=dtype)
    v = torch.randn(B, N, H, V, dtype=dtype)
    F_ = K if decay == "key" else 1
    log_f = -3 * torch.rand(B, N, H, F_, dtype=dtype)
    return q, k, v, log_f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", ["head", "key"])
@pytest.mark.parametrize("N", [32, 37])  # a multiple of the chunk size 8, and not
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_equals_recurrent(dtype, decay, N, normalize):
    q, k, v, log_f = _inputs(N=N, dtype=dtype, decay=decay)
    gate, D = torch.rand_like(v), torch.randn(3, 5, dtype=dtype)
    kw = dict(kernel="elu+1", input_gate=gate, log_forget=log_f, shortcut=D, normalize=normalize, causal=True)
    y, s = gated_linear_attention(q, k, v, mode="chunked", chunk_size=8, return_state=True, **kw)
    y_ref, s_ref = gated_linear_attention(q, k, v, mode="recurrent", return_state=True, **kw)
    assert y.shape == v.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(s, s_ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_chunked_separate_normaliser_inputs():
    q, k, v, log_f = _inputs(N=21)
    qn, kn = torch.randn_like(q), torch.randn_like(k)
    kw = dict(kernel="elu+1", log_forget=log_f, q_norm=qn, k_norm=kn, causal=True)
    y = gated_linear_attention(q, k, v, mode="chunked", chunk_size=4, **kw)
    torch.testing.assert_close(y, gated_linear_attention(q, k, v, mode="recurrent", **kw))


def test_chunked_gradients_equal_recurrent():
    q, k, v, log_f = (t.requires_grad_() for t in _inputs(N=19, H=2, K=3, V=2))
    grads = []
    for mode in ("chunked", "recurrent"):
        y = gated_linear_attention(q, k, v, kernel="elu+1", log_forget=log_f, causal=True, mode=mode, chunk_size=8)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), (q, k, v, log_f)))
    for g_chunked, g_ref in zip(*grads):
        torch.testing.assert_close(g_chunked, g_ref, atol=1e-8, rtol=1e-7)


def test_chunked_is_stable_under_strong_decay():
    """Decays of exp(-60) per token: a factorised exp(-b_j) would overflow float32 within a chunk."""
    q, k, v, _ = _inputs(N=70, dtype=torch.float32)
    log_f = torch.full((2, 70, 3, 4), -60.0)
    kw = dict(kernel="elu+1", log_forget=log_f, causal=True, normalize=False)
    y = gated_linear_attention(q, k, v, mode="chunked", chunk_size=64, **kw)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, gated_linear_attention(q, k, v, mode="recurrent", **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", ["head", "key"])
@pytest.mark.parametrize("strong", [-30.0, -400.0])  # beyond float32's factorisation limit; -400 also float64's
def test_chunked_mixes_factorised_and_log_space_chunks(dtype, decay, strong, monkeypatch):
    """Chunks whose total decay would overflow the factorised form take the log-space form; the
    others stay factorised; together they still equal the recurrence (values and final state)."""
    q, k, v, log_f = _inputs(N=45, dtype=dtype, decay=decay)
    log_f = log_f / 6  # weak: at most 0.5 per token, 4 per chunk of 8
    log_f[0, 9:11] = strong  # two strong tokens in the second chunk of batch 0
    log_f[1, 40:42, 1] = strong  # two in the last (padded) chunk of batch 1, head 1
    exact_rows = []
    exact = linear_attention._intra_chunk_exact
    monkeypatch.setattr(linear_attention, "_intra_chunk_exact", lambda q, *a: exact_rows.append(len(q)) or exact(q, *a))
    kw = dict(kernel="elu+1", log_forget=log_f, causal=True)
    y, s = gated_linear_attention(q, k, v, mode="chunked", chunk_size=8, return_state=True, **kw)
    y_ref, s_ref = gated_linear_attention(q, k, v, mode="recurrent", return_state=True, **kw)
    if -2 * strong > math.log(torch.finfo(dtype).max) / 2:  # the documented limit of the factorised form
        assert 0 < sum(exact_rows) < 2 * 3 * 6  # some of the batch x heads x chunks rows, not all
    else:
        assert not exact_rows
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(s, s_ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("decay", ["head", "key"])
def test_chunked_gradients_under_strong_decay(decay):
    q, k, v, log_f = _inputs(N=21, H=2, K=3, V=2, decay=decay)
    log_f = log_f / 6
    log_f[:, 5:7] = -400.0  # the second chunk of 4 takes the log-space form
    q, k, v, log_f = (t.requires_grad_() for t in (q, k, v, log_f))
    weights = torch.randn(2, 21, 2, 2, dtype=q.dtype)
    grads = []
    for mode in ("chunked", "recurrent"):
        y = gated_linear_attention(q, k, v, kernel="elu+1", log_forget=log_f, causal=True, mode=mode, chunk_size=4)
        grads.append(torch.autograd.grad((y * weights).sum(), (q, k, v, log_f)))
    for g_chunked, g_ref in zip(*grads):
        assert torch.isfinite(g_chunked).all()
        torch.testing.assert_close(g_chunked, g_ref, atol=1e-8, rtol=1e-7)


def test_elu_plus_one_kernel_equals_elu():
    x = torch.tensor([-1e4, -100.0, -3.0, -1e-9, 0.0, 1e-9, 2.0, 100.0, 1e30], dtype=torch.float64, requires_grad=True)
    y = feature_map("elu+1")(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.elu(x_ref) + 1
    torch.testing.assert_close(y, y_ref, rtol=1e-14, atol=1e-15)  # F.elu + 1 rounds exp(-100) to 0
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(y_ref.sum(), x_ref)[0])


def test_causal_without_gates_equals_cumulative_sums():
    q, k, v, _ = _inputs(N=29)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    S = torch.einsum("bnhk,bnhv->bnhkv", phi_k, v).cumsum(dim=1)  # S_i = sum_{j<=i} k_j^T v_j
    Z = phi_k.cumsum(dim=1)
    expected = torch.einsum("bnhk,bnhkv->bnhv", phi_q, S) / torch.einsum("bnhk,bnhk->bnh", phi_q, Z).unsqueeze(-1)
    y = gated_linear_attention(q, k, v, kernel="elu+1", causal=True, eps=0.0, chunk_size=8)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_explicit_attention_matrix(causal):
    q, k, v, _ = _inputs(N=23)
    expected = linear_attention_quadratic(F.elu(q) + 1, F.elu(k) + 1, v, causal=causal, eps=0.0)
    # The N x N form by hand: rows of phi(Q) phi(K)^T divided by their sums, times V.
    A = torch.einsum("bihk,bjhk->bhij", F.elu(q) + 1, F.elu(k) + 1)
    if causal:
        A = A.tril()
    torch.testing.assert_close(expected, torch.einsum("bhij,bjhv->bihv", A / A.sum(-1, keepdim=True), v))
    y = gated_linear_attention(q, k, v, kernel="elu+1", causal=causal, eps=0.0)
    torch.testing.assert_close(y, expected)


def test_non_causal_with_gate_and_shortcut_equals_explicit_form():
    q, k, v, _ = _inputs(N=17)
    gate, D = torch.rand_like(v), torch.randn(3, 5, dtype=v.dtype)
    expected = linear_attention_quadratic(q, k, v * gate, normalize=False) + D * v
    y = gated_linear_attention(q, k, v, input_gate=gate, shortcut=D, normalize=False)
    torch.testing.assert_close(y, expected)


def test_expresses_mlla_attention_exactly():
    """MLLA's attention (SPEC section 3), per head: numerator on RoPE-rotated phi(q), phi(k),
    ``z = 1 / (q . mean_tokens(k) + 1e-6)`` on the un-rotated ones."""
    B, Hh, W, C, heads = 2, 5, 6, 16, 2
    N, d = Hh * W, C // heads
    qk = F.elu(torch.randn(B, Hh, W, 2 * C, dtype=torch.float64)) + 1
    v = torch.randn(B, N, heads, d, dtype=torch.float64)
    qk_rot = apply_rope_2d(qk, *rope_2d_tables(Hh, W, C, repeats=2))
    split = lambda t: t.reshape(B, N, 2, heads, d).unbind(2)  # noqa: E731
    (q, k), (qr, kr) = split(qk), split(qk_rot)
    z = 1 / (torch.einsum("bnhd,bhd->bnh", q, k.mean(dim=1)) + 1e-6)
    kv = torch.einsum("bnhd,bnhe->bhde", kr / N**0.5, v / N**0.5)
    expected = torch.einsum("bnhd,bhde->bnhe", qr, kv) * z.unsqueeze(-1)
    y = gated_linear_attention(qr, kr, v, q_norm=q, k_norm=k, eps=1e-6)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-10)


def test_half_precision_keeps_dtype():
    q, k, v, log_f = _inputs(N=20, dtype=torch.float32)
    y = gated_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kernel="elu+1", log_forget=log_f, causal=True)
    assert y.dtype == torch.bfloat16
    ref = gated_linear_attention(q, k, v, kernel="elu+1", log_forget=log_f, causal=True)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(log_forget=torch.zeros(2, 37, 3, 4, dtype=torch.float64)), "causal=True"),
        (dict(mode="chunked"), "causal=True"),
        (dict(mode="parallel", causal=True), "non-causal"),
        (dict(mode="fast"), "unknown mode"),
        (dict(kernel="gelu"), "unknown kernel"),
        (dict(causal=True, log_forget=torch.zeros(2, 37, 3, 2, dtype=torch.float64)), "log_forget"),
        (dict(q_norm=torch.zeros(2, 37, 3, 5)), "q_norm"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        gated_linear_attention(q, k, v, **kwargs)


def test_bad_value_shape_is_explained():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"v must be \(B, N, H, V\)"):
        gated_linear_attention(q, k, v[:, :-1])
