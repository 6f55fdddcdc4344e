"""MLLA's attention operator: its three forms agree, and the fused Triton kernel equals the PyTorch
form in values and gradients; the backend switch falls back where Triton or CUDA is missing.

Without a CUDA device the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
conftest.py); with one, the same tests run it on the GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mlla  # noqa: F401  (registers the models)
from mlla.benchmark import precision
import mlla.ops.mlla_attn.backend as backend
from mlla.ops import attention_backend, get_attention_backend, mlla_attention, rope_2d_head_tables, set_attention_backend
from mlla.ops.mlla_attn import add_mlla_attention_, mlla_attention_naive, mlla_attention_torch, uses_kernel

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
# Head counts of MLLA-T/S (C=64: 2-4-8-16) and MLLA-B (C=96: 3-6-12-24), all of head dim 32, each on an odd grid.
HEADS_AND_GRIDS = [(2, (7, 9)), (4, (1, 1)), (8, (13, 5)), (16, (7, 9)), (3, (13, 5)), (6, (7, 9)), (12, (1, 1)), (24, (5, 3))]


def _inputs(heads: int, grid: tuple[int, int], batch: int = 1, head_dim: int = 32, dtype=torch.float32, seed: int = 0,
            device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    qk = torch.randn(batch, N, 2, heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(batch, N, heads, head_dim, generator=g).to(device, dtype)
    cos, sin = rope_2d_head_tables(*grid, heads * head_dim, heads, device=device)
    return qk, v, cos, sin


def _rel_err(x: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """Largest error relative to the largest reference value (or to ``scale``)."""
    return ((x.double() - ref).abs().max() / (ref.abs().max() if scale is None else scale)).item()


@pytest.fixture
def device():
    """Where the kernel runs (CPU under Triton's interpreter, else CUDA), with the 'triton' backend on."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        where = "cpu"
    elif torch.cuda.is_available():
        where = "cuda"
    else:
        pytest.skip("the kernel needs a CUDA device or TRITON_INTERPRET=1 set before Triton is imported")
    with attention_backend("triton"):
        yield where


@pytest.fixture
def strict_float32():
    """No TF32 in convolutions or matmuls for the test: on CUDA, cuDNN's TF32 default alone moves a
    model's first-layer gradients by about 1e-3 relative, whichever attention runs."""
    with precision("fp32", torch.device("cuda")):
        yield


def test_pytorch_forms_equal_the_naive_reference_in_float64():
    qk, v, cos, sin = (t.double() for t in _inputs(3, (5, 7), batch=2))
    ref = mlla_attention_naive(qk, v, cos, sin)
    assert torch.allclose(mlla_attention_torch(qk, v, cos, sin), ref, rtol=1e-12, atol=1e-12)
    # The in-place inference form takes q, k with each head's pairs de-interleaved and adds into its output.
    deinterleaved = torch.cat([qk[..., 0::2], qk[..., 1::2]], dim=-1)
    out = torch.ones_like(ref)
    add_mlla_attention_(out, deinterleaved.clone(), v, cos, sin)
    assert torch.allclose(out, ref + 1, rtol=1e-12, atol=1e-12)
    assert get_attention_backend() == "auto"  # the default: the kernel only for CUDA tensors
    assert torch.equal(mlla_attention(qk, v, cos, sin), mlla_attention_torch(qk, v, cos, sin))


@needs_triton
@pytest.mark.parametrize("heads, grid", HEADS_AND_GRIDS)
@pytest.mark.parametrize("separable", [False, True], ids=["full-tables", "first-row-and-column"])
def test_kernel_equals_pytorch_form_fp32_and_within_its_bf16_error(device, heads, grid, separable):
    qk, v, cos, sin = _inputs(heads, grid, device=device)
    assert uses_kernel(qk, v, cos)
    width = grid[1] if separable else None  # given the width, the kernel reads the tables' first row and column only
    ref64 = mlla_attention_naive(qk.double(), v.double(), cos.double(), sin.double())
    out = mlla_attention(qk, v, cos, sin, width=width)
    assert out.dtype == torch.float32 and out.shape == ref64.shape
    assert _rel_err(out, mlla_attention_torch(qk, v, cos, sin).double()) <= 1e-5
    # bfloat16 inputs (as under autocast): within twice the PyTorch form's own bfloat16 error, or two
    # bfloat16 rounding units (a 1x1 grid's output is v itself, rounded once by the form, twice by the kernel).
    qk16, v16 = qk.bfloat16(), v.bfloat16()
    ref64 = mlla_attention_naive(qk16.double(), v16.double(), cos.double(), sin.double())
    out16 = mlla_attention(qk16, v16, cos, sin, width=width)
    assert out16.dtype == torch.bfloat16
    assert _rel_err(out16, ref64) <= max(2 * _rel_err(mlla_attention_torch(qk16, v16, cos, sin), ref64), 2 ** -7)


@needs_triton
@pytest.mark.parametrize("heads, grid, head_dim, dtype", [
    (2, (7, 9), 32, torch.float32), (3, (1, 1), 32, torch.float32), (4, (13, 5), 32, torch.float32),
    (1, (6, 5), 16, torch.float32),  # head dim 16 (test_mlla's first stages): blocks padded
    (2, (7, 9), 32, torch.float16),
])
@pytest.mark.parametrize("separable", [False, True], ids=["full-tables", "first-row-and-column"])
def test_kernel_gradients_match_float64(device, heads, grid, head_dim, dtype, separable):
    qk, v, cos, sin = _inputs(heads, grid, batch=2, head_dim=head_dim, dtype=dtype, device=device)
    grad_out = torch.randn(qk.shape[0], qk.shape[1], heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device)
    qk64, v64 = qk.double().requires_grad_(), v.double().requires_grad_()
    ref = torch.autograd.grad(mlla_attention_naive(qk64, v64, cos.double(), sin.double()), (qk64, v64), grad_out.double())

    def grads(fn):
        qk_, v_ = qk.clone().requires_grad_(), v.clone().requires_grad_()
        return torch.autograd.grad(fn(qk_, v_, cos, sin), (qk_, v_), grad_out.to(dtype))

    kernel = grads(functools.partial(mlla_attention, width=grid[1] if separable else None))
    with attention_backend("torch"):
        pytorch = grads(mlla_attention)
    # Errors relative to the largest gradient of either input (on a 1x1 grid the output depends on q
    # only through eps: dq is about 1e-9 and pure rounding, dv about 1).
    scale = max(g.abs().max().item() for g in ref)
    for name, got, own, want in zip(("qk", "v"), kernel, pytorch, ref):
        assert got.dtype == dtype and got.shape == want.shape
        bound = max(2 * _rel_err(own, want, scale), 1e-5 if dtype == torch.float32 else 2e-3)
        assert _rel_err(got, want, scale) <= bound, name


@needs_triton
def test_model_with_kernel_equals_pytorch_path_training_and_fused_inference(device, strict_float32):
    model = timm.create_model("test_mlla", num_classes=5).to(device)  # head dims 16 and 32, one to four heads
    x = torch.randn(2, 3, 36, 44, device=device)  # stage grids 9x11, 5x6 (padded), 3x3, 2x2
    kernel_out = model(x)
    kernel_out.sum().backward()
    kernel_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with attention_backend("torch"):
        ref = model(x)
        ref.sum().backward()
    assert torch.allclose(kernel_out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(kernel_grads[n], p.grad, rtol=1e-3, atol=1e-5), n
    model.eval().fuse()
    with torch.no_grad():
        fused = model(x)
        with attention_backend("torch"):
            assert torch.allclose(fused, model(x), rtol=1e-4, atol=1e-5)


@needs_triton
def test_compile_keeps_the_kernel_in_one_graph_and_export_sees_the_pytorch_form(device):
    qk, v, cos, sin = _inputs(2, (5, 3), batch=2, device=device)
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(mlla_attention, fullgraph=True, backend=count)
    qk_ = qk.clone().requires_grad_()
    out = compiled(qk_, v, cos, sin)
    out.sum().backward()
    assert len(graphs) == 1  # forward; the kernel's forward op sits in the autograd.Function's subgraph
    targets = {str(n.target) for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes}
    assert "mlla.mlla_attention_fwd.default" in targets
    assert torch.allclose(out, mlla_attention_torch(qk, v, cos, sin), rtol=1e-5, atol=1e-6)
    assert qk_.grad is not None and torch.isfinite(qk_.grad).all()

    class Attention(torch.nn.Module):
        def forward(self, qk, v, cos, sin):
            return mlla_attention(qk, v, cos, sin)

    exported = torch.export.export(Attention(), (qk, v, cos, sin), strict=False)
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("mlla_attention" in name for name in names) and any("bmm" in n or "matmul" in n for n in names)


@needs_triton
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_compiled_model_is_one_graph_with_and_without_the_kernel(device, attention, strict_float32):
    model = timm.create_model("test_mlla", num_classes=5).to(device)
    x = torch.randn(2, 3, 36, 44, device=device)
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with attention_backend(attention):
        ref = model(x)
        out = torch.compile(model, fullgraph=True, backend=count)(x)
    assert len(graphs) == 1
    targets = {str(n.target) for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes}
    assert ("mlla.mlla_attention_fwd.default" in targets) == (attention == "triton")
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    if device == "cuda":  # inductor itself on the card: one graph (fullgraph) with and without the kernel
        with attention_backend(attention):
            compiled = torch.compile(model, fullgraph=True)(x)
        assert torch.allclose(compiled, ref, rtol=1e-3, atol=1e-4)


@needs_triton
def test_a_compiled_call_is_not_compiled_again_after_the_kernels_first_import(device):
    # A fresh process, where the kernel's module is not imported yet: choosing "triton" imports it, so
    # the first compiled call does not change state its graph guards on (it did: one recompilation).
    script = (
        "import torch, timm, mlla, mlla.ops\n"
        "from torch._dynamo.utils import counters\n"
        f"model, x = timm.create_model('test_mlla').to({device!r}), torch.randn(2, 3, 32, 32, device={device!r})\n"
        "mlla.ops.set_attention_backend('triton')\n"
        "compiled = torch.compile(model, backend='aot_eager')\n"
        "compiled(x).sum().backward(); compiled(x).sum().backward()\n"
        "print(counters['stats']['unique_graphs'], sum(counters['recompiles'].values()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(mlla.__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "0"]  # one graph, compiled once


def test_a_failed_kernel_import_and_a_repeated_backend_leave_the_setting_as_it_was(monkeypatch):
    def broken():
        raise ImportError("triton is broken here")

    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "fused_attention", broken)
    with attention_backend("torch"):
        with pytest.raises(ImportError, match="broken"):
            set_attention_backend("triton")
        assert get_attention_backend() == "torch"
    # The backend in force already: its state (a fall-back of 'auto') is kept, not reset.
    assert get_attention_backend() == "auto"
    monkeypatch.setattr(backend._state, "failed", "an earlier first launch failed")
    with attention_backend("auto"):
        assert backend._state.failed == "an earlier first launch failed"
    assert backend._state.failed == "an earlier first launch failed"


def test_switch_falls_back_where_triton_or_cuda_is_missing(monkeypatch):
    qk, v, cos, sin = _inputs(2, (3, 3))
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        set_attention_backend("cuda")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton, which is not installed"):
        set_attention_backend("triton")
    assert get_attention_backend() == "auto"
    with attention_backend("auto"):  # no Triton: the PyTorch form, silently
        assert get_attention_backend() == "auto" and not uses_kernel(qk, v, cos)
        assert torch.equal(mlla_attention(qk, v, cos, sin), mlla_attention_torch(qk, v, cos, sin))
    assert get_attention_backend() == "auto"


@needs_triton
def test_switch_uses_pytorch_form_for_tensors_off_cuda(monkeypatch):
    """With Triton but without CUDA (and without the interpreter): 'triton' warns once, 'auto' is silent."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qk, v, cos, sin = _inputs(2, (3, 3))
    with attention_backend("triton"):
        with pytest.warns(UserWarning, match="runs on CUDA tensors; tensors on cpu use the PyTorch form"):
            out = mlla_attention(qk, v, cos, sin)
        assert torch.equal(out, mlla_attention_torch(qk, v, cos, sin))
    with attention_backend("auto"):
        assert not uses_kernel(qk, v, cos)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with attention_backend("auto"):  # 'auto' never runs the interpreter
        assert not uses_kernel(qk, v, cos)
    with attention_backend("triton"):  # 'triton' does, for CPU tensors too; float64 is not a kernel dtype
        assert uses_kernel(qk, v, cos) and not uses_kernel(qk.double(), v.double(), cos)


def test_auto_uses_the_kernel_on_cuda_in_eager_mode_only(monkeypatch):
    """'auto' on a CUDA tensor (faked: the rule reads metadata only): the kernel in eager mode on
    compute capability 8.0 and newer; the PyTorch form under torch.compile and on older GPUs."""
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    qk = torch.empty(1, 4, 2, 2, 32, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(backend, "_capability_major", lambda index: 9)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cos = torch.empty(2, 4, 16, device="meta")
    with attention_backend("auto"):
        assert uses_kernel(qk, qk[:, :, 0], cos)
        assert not uses_kernel(qk.double(), qk[:, :, 0].double(), cos)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not uses_kernel(qk, qk[:, :, 0], cos)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        monkeypatch.setattr(backend, "_capability_major", lambda index: 7)
        assert not uses_kernel(qk, qk[:, :, 0], cos)
    with attention_backend("torch"):
        monkeypatch.setattr(backend, "_capability_major", lambda index: 9)
        assert not uses_kernel(qk, qk[:, :, 0], cos)



def _broken_launch(*args, **kwargs):
    raise RuntimeError("PassManager::run failed")  # as Triton reports a kernel it cannot compile for a GPU


@needs_triton
def test_auto_falls_back_to_the_pytorch_form_when_the_kernel_fails_to_launch(device, monkeypatch):
    """The kernel's first launch for a shape fails (a compile error on some GPU): under 'auto' a warning
    and the PyTorch form from then on; under 'triton', asked for explicitly, the error itself."""
    from mlla.ops.mlla_attn import fused, kernel

    qk, v, cos, sin = _inputs(2, (5, 3), device=device)
    monkeypatch.setattr(fused, "_launched", set())
    monkeypatch.setattr(kernel, "forward", _broken_launch)
    # 'auto' as on a CUDA tensor (the rule reads metadata; here the tensors are the interpreter's CPU ones).
    monkeypatch.setattr(mlla.ops.mlla_attn, "uses_kernel",
                        lambda *a: backend._state.backend == "triton" or backend._state.failed is None)
    with attention_backend("triton"):
        with pytest.raises(RuntimeError, match="PassManager"):
            mlla_attention(qk, v, cos, sin)
    with attention_backend("auto"):
        with pytest.warns(UserWarning, match="PyTorch form from now on"):
            out = mlla_attention(qk, v, cos, sin)
        assert torch.equal(out, mlla_attention_torch(qk, v, cos, sin))
        assert backend._state.failed.startswith("RuntimeError: PassManager")
        assert torch.equal(mlla_attention(qk, v, cos, sin), out)  # no second try, no second warning
    assert backend._state.failed is None  # setting a backend again tries the kernel again


@needs_triton
def test_a_backward_kernel_that_fails_to_launch_gives_the_pytorch_forms_gradients_under_auto(device, monkeypatch):
    from mlla.ops.mlla_attn import fused, kernel

    qk, v, cos, sin = _inputs(2, (5, 3), device=device)
    ref = qk.clone().requires_grad_()
    (want,) = torch.autograd.grad(mlla_attention_torch(ref, v, cos, sin).sum(), ref)
    monkeypatch.setattr(fused, "_launched", set())
    monkeypatch.setattr(kernel, "backward", _broken_launch)
    qk = qk.requires_grad_()
    with attention_backend("triton"):
        with pytest.raises(RuntimeError, match="PassManager"):
            fused.fused_mlla_attention(qk, v, cos, sin).sum().backward()
    with attention_backend("auto"):
        out = fused.fused_mlla_attention(qk, v, cos, sin)
        with pytest.warns(UserWarning, match="PyTorch form from now on"):
            (grad,) = torch.autograd.grad(out.sum(), qk)
    assert torch.allclose(grad, want, rtol=1e-5, atol=1e-6)
