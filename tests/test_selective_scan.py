"""``selective_scan`` (the unified operator, configured as Mamba) equals Mamba's step-by-step scan."""
from __future__ import annotations

import itertools

import pytest
import torch

from mlla.ops import selective_scan
from mlla.ops.naive import selective_scan_ref

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
OPTIONS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, delta_softplus


def _args(b, d, n, L, dtype, groups=None, with_D=True, with_z=True, with_bias=True):
    """Random arguments; ``delta + delta_bias`` stays positive (a decaying state) also without softplus."""
    bc_shape = (b, n, L) if groups is None else (b, groups, n, L)
    return dict(
        u=torch.randn(b, d, L, dtype=dtype),
        delta=0.5 * torch.rand(b, d, L, dtype=dtype) + 0.1,
        A=-torch.rand(d, n, dtype=dtype) * 4 - 0.1,
        B=torch.randn(*bc_shape, dtype=dtype),
        C=torch.randn(*bc_shape, dtype=dtype),
        D=torch.randn(d, dtype=dtype) if with_D else None,
        z=torch.randn(b, d, L, dtype=dtype) if with_z else None,
        delta_bias=torch.rand(d, dtype=dtype) - 0.1 if with_bias else None,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_D, with_z, with_bias, softplus", OPTIONS)
def test_equals_step_by_step(dtype, with_D, with_z, with_bias, softplus):
    gen = torch.Generator().manual_seed(hash((with_D, with_z, with_bias, softplus)) % 2**31)
    b, d, n, L = (int(x) for x in torch.randint(1, 6, (4,), generator=gen) + torch.tensor([0, 1, 1, 20]))
    args = _args(b, d, n, L, dtype, with_D=with_D, with_z=with_z, with_bias=with_bias)
    y, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, chunk_size=8)
    y_ref, last_ref = selective_scan_ref(**args, delta_softplus=softplus, return_last_state=True)
    assert y.shape == (b, d, L) and last.shape == (b, d, n) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(last, last_ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_default_chunk_and_grouped_B_C():
    args = _args(2, 6, 4, 45, torch.float64, groups=3)
    torch.testing.assert_close(selective_scan(**args, delta_softplus=True), selective_scan_ref(**args, delta_softplus=True))


def test_gradients_equal_step_by_step():
    args = {k: v.requires_grad_() for k, v in _args(2, 3, 4, 21, torch.float64).items()}
    weights = torch.randn(2, 3, 21, dtype=torch.float64)
    grads = []
    for fn in (selective_scan, selective_scan_ref):
        y = fn(**args, delta_softplus=True)
        grads.append(torch.autograd.grad((y * weights).sum(), list(args.values())))
    for name, g, g_ref in zip(args, *grads):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-7, msg=lambda m: f"grad of {name}: {m}")


def test_half_precision_input():
    args = _args(1, 4, 4, 30, torch.float32)
    y = selective_scan(**{k: v.bfloat16() for k, v in args.items()}, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), selective_scan_ref(**args, delta_softplus=True), atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(delta=torch.zeros(2, 3, 5)), "delta must have the shape of u"),
        (dict(A=torch.zeros(4, 4)), r"A must be \(dim, state\)"),
        (dict(B=torch.zeros(2, 5, 10)), r"B must be \(batch, state, L\)"),
        (dict(C=torch.zeros(2, 2, 4, 10)), "groups dividing dim"),
    ],
)
def test_bad_shapes_are_explained(change, match):
    args = _args(2, 3, 4, 10, torch.float32)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        selective_scan(**args)
