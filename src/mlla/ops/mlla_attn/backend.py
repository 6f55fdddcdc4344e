"""The switch between MLLA's attention in PyTorch and the fused Triton kernel.

One process-wide setting, :func:`set_attention_backend` (or the context manager
:func:`attention_backend`), decides; nothing else does. The rule, applied per call:

* ``"auto"`` (the default): the fused kernel for CUDA tensors of a GPU of compute capability 8.0
  or newer in eager mode, where Triton is installed; the PyTorch form under ``torch.compile``
  (inductor fuses its elementwise steps itself; the kernel under compile was not measured on a
  GPU), on other devices and without Triton. Never Triton's CPU interpreter. If the kernel's
  first launch for a shape fails (it does not compile for the GPU, or needs more resources than
  the GPU has), a warning says so and the PyTorch form takes over (:func:`fall_back_after`).
* ``"torch"``: the PyTorch form (:func:`mlla.ops.mlla_attn.parallel.mlla_attention_torch`).
* ``"triton"``: the fused kernel wherever it can run, compiled graphs included: CUDA tensors (any
  device under ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use). Elsewhere
  the PyTorch form, with a warning once per process for tensors on a device the kernel does not
  run on. Setting it imports the kernel (and Triton) at once, and raises a :class:`RuntimeError`
  where Triton is not installed.

The kernel takes ``qk`` and ``v`` of one dtype among float32 / bfloat16 / float16 and float32
RoPE tables; other dtypes use the PyTorch form. Under ``torch.export``, ``torch.fx`` symbolic
tracing and the TorchScript tracer the PyTorch form is always used (exported and traced graphs
stay plain PyTorch). The checks read the setting and each tensor's device and dtype (metadata,
which ``torch.compile`` guards on), never its values.

Why ``"auto"`` is the default: on an H200 (``benchmarks/results/gpu``) the kernel was faster than
the PyTorch form in every eager case measured: the attention alone 1.4x to 7.7x, MLLA-T's bf16
training step 1.12x and its bf16 inference at batch 256 1.39x, with less peak memory.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Callable, Iterator

import torch

__all__ = [
    "BACKENDS", "FirstLaunchError", "attention_backend", "check_backend", "fall_back_after", "fused_attention", "get_attention_backend",
    "interpreter_requested", "set_attention_backend", "uses_kernel",
]

BACKENDS = ("torch", "triton", "auto")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _State:
    backend: str = "auto"
    fused: Callable | None = None  # fused_mlla_attention, imported on first use
    interpreted: bool = False  # TRITON_INTERPRET=1 when the backend was set
    warned: bool = False
    failed: str | None = None  # why 'auto' stopped using the kernel (its first launch for a shape failed)


_state = _State()


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (set, and not ``0``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether Triton can be imported (looked up once, at import; monkeypatched by the tests)."""
    return _HAS_TRITON


def set_attention_backend(name: str) -> None:
    """Choose how MLLA's attention runs: ``"auto"`` (default), ``"torch"`` or ``"triton"`` (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise RuntimeError(
            "attention backend 'triton' needs Triton, which is not installed: install a PyTorch build "
            "with Triton (pip install triton on Linux with CUDA), or use set_attention_backend('auto'), "
            "which falls back to the PyTorch form"
        )
    if name == "triton":
        fused_attention()  # imported now (a failed import changes nothing): inside a torch.compile'd call it would recompile the call
    _state.backend, _state.warned, _state.failed = name, False, None
    _state.interpreted = interpreter_requested()


def check_backend(name: str, device_type: str, flag: str = "attention backend") -> None:
    """Raise a :class:`ValueError` saying what to do where the backend ``name`` cannot run on
    ``device_type`` tensors (``flag``: how the caller names the setting): an unknown name, or
    ``"triton"`` without Triton, or on another device than CUDA outside Triton's interpreter
    (``TRITON_INTERPRET=1``, for checks, not speed). ``"auto"`` and ``"torch"`` run everywhere."""
    if name not in BACKENDS:
        raise ValueError(f"unknown {flag} {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "triton":
        return
    if not triton_available():
        raise ValueError(f"{flag} triton needs Triton, which is not installed: install a PyTorch build with Triton "
                         f"(Linux with CUDA), or use auto or torch")
    if device_type != "cuda" and not interpreter_requested():
        raise ValueError(f"{flag} triton runs the fused kernel on CUDA, and this runs on {device_type}: use --device "
                         f"cuda, or auto or torch (the PyTorch form); on a CPU only under TRITON_INTERPRET=1 (Triton's "
                         f"interpreter, for checks, not speed)")


def fused_attention() -> Callable:
    """:func:`mlla.ops.mlla_attn.fused.fused_mlla_attention` (imports Triton on first use)."""
    if _state.fused is None:
        from .fused import fused_mlla_attention

        _state.fused = fused_mlla_attention
    return _state.fused


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def get_attention_backend() -> str:
    """The current attention backend name."""
    return _state.backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """``with attention_backend("triton"): ...`` sets the backend for the block, then restores the
    previous one. The backend in force already is left as it is (a fall-back of ``"auto"`` stays)."""
    previous = _state.backend
    if name == previous:
        yield
        return
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _tracing_to_plain_graph() -> bool:
    """Export, TorchScript or FX symbolic tracing (they see the PyTorch form); not ``torch.compile``,
    whose graph keeps the kernel as one custom op. (``is_fx_tracing`` is also true under Dynamo on
    some torch versions, 2.11 on an H200: hence compile first, then the symbolic-trace check.)"""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling():
        return False
    fx = torch.fx._symbolic_trace
    return getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)()


class FirstLaunchError(RuntimeError):
    """The fused kernel failed at its first launch for a shape (where Triton compiles it) and
    :func:`fall_back_after` chose the PyTorch form; the error is the ``__cause__``."""


def fall_back_after(error: BaseException) -> bool:
    """After the kernel's first launch for a shape failed with ``error`` (a Triton compilation
    error, a GPU without the resources its blocks need): under ``"auto"`` in eager mode, warn once
    and use the PyTorch form from then on (until :func:`set_attention_backend` is called again),
    returning True; under ``"triton"`` (asked for explicitly) or ``torch.compile``, False: the
    caller raises."""
    if _state.backend != "auto" or torch.compiler.is_compiling():
        return False
    _state.failed = f"{type(error).__name__}: {error}"
    warnings.warn(
        "the fused MLLA attention kernel failed at its first launch for these inputs, so attention backend "
        f"'auto' uses the PyTorch form from now on (same results, slower on a GPU). The error: {_state.failed[:2000]}",
        stacklevel=4,
    )
    return True


def uses_kernel(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`mlla.ops.mlla_attention` runs the fused kernel for these inputs (the rule above)."""
    backend = _state.backend
    if backend == "torch" or not triton_available() or _tracing_to_plain_graph():  # FX: before reading a proxy
        return False
    if backend == "auto":
        if not qk.is_cuda or _state.failed:
            return False
        index = qk.device.index if qk.device.index is not None else torch.cuda.current_device()
        if torch.compiler.is_compiling() or _capability_major(index) < 8:
            return False
    elif not (qk.is_cuda or _state.interpreted):
        if not _state.warned and not torch.compiler.is_compiling():
            _state.warned = True
            warnings.warn(
                f"attention backend 'triton' runs on CUDA tensors; tensors on {qk.device} use the PyTorch form",
                stacklevel=3,
            )
        return False
    return qk.dtype in _KERNEL_DTYPES and v.dtype == qk.dtype and cos.dtype == torch.float32
