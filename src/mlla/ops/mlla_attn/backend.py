"""The switch between MLLA's attention in PyTorch and the fused Triton kernel.

One process-wide setting, :func:`set_attention_backend` (or the context manager
:func:`attention_backend`), decides; nothing else does. The rule, applied per call:

* ``"torch"`` (the default): the PyTorch form (:func:`mlla.ops.mlla_attn.parallel.mlla_attention_torch`).
* ``"triton"``: the fused kernel wherever it can run: CUDA tensors (any device under
  ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use), ``qk`` and ``v`` of one
  dtype among float32 / bfloat16 / float16 and float32 RoPE tables. Elsewhere the PyTorch form,
  with a warning once per process for tensors on a device the kernel does not run on. Setting it
  raises a :class:`RuntimeError` where Triton is not installed.
* ``"auto"``: as ``"triton"`` where Triton is installed, without the warning; the PyTorch form
  everywhere when it is not.

Under ``torch.export``, ``torch.fx`` symbolic tracing and the TorchScript tracer the PyTorch form
is always used (exported and traced graphs stay plain PyTorch). The checks read the setting and
each tensor's device and dtype (metadata, which ``torch.compile`` guards on), never its values.

The default stays ``"torch"`` until a GPU run of ``benchmarks/gpu_all.sh`` shows the kernel faster.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Callable, Iterator

import torch

__all__ = ["BACKENDS", "attention_backend", "get_attention_backend", "set_attention_backend", "uses_kernel"]

BACKENDS = ("torch", "triton", "auto")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _State:
    backend: str = "torch"
    fused: Callable | None = None  # fused_mlla_attention, once imported
    interpreted: bool = False  # TRITON_INTERPRET=1 when the backend was set
    warned: bool = False


_state = _State()


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once; monkeypatched by the tests)."""
    return importlib.util.find_spec("triton") is not None


def set_attention_backend(name: str) -> None:
    """Choose how MLLA's attention runs: ``"torch"`` (default), ``"triton"`` or ``"auto"`` (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    fused = None
    if name != "torch" and triton_available():
        from .fused import fused_mlla_attention as fused
    elif name == "triton":
        raise RuntimeError(
            "attention backend 'triton' needs Triton, which is not installed: install a PyTorch build "
            "with Triton (pip install triton on Linux with CUDA), or use set_attention_backend('auto'), "
            "which falls back to the PyTorch form"
        )
    _state.backend, _state.fused, _state.warned = name, fused, False
    _state.interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get_attention_backend() -> str:
    """The current attention backend name."""
    return _state.backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """``with attention_backend("triton"): ...`` sets the backend for the block, then restores the previous one."""
    previous = _state.backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _tracing_to_plain_graph() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_tracing()


def uses_kernel(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`mlla.ops.mlla_attention` runs the fused kernel for these inputs (the rule above)."""
    if _state.fused is None or _tracing_to_plain_graph():
        return False
    if not (qk.is_cuda or _state.interpreted):
        if _state.backend == "triton" and not _state.warned and not torch.compiler.is_compiling():
            _state.warned = True
            warnings.warn(
                f"attention backend 'triton' runs on CUDA tensors; tensors on {qk.device} use the PyTorch form",
                stacklevel=3,
            )
        return False
    return qk.dtype in _KERNEL_DTYPES and v.dtype == qk.dtype and cos.dtype == torch.float32
