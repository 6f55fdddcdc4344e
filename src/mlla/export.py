"""Export to ONNX and to ``torch.export`` programs, with dynamic batch and image size.

One exported file runs at any batch size and image size (height and width independently);
:func:`check_export` compares it with the PyTorch model at several sizes. BatchNorms are folded
(``model.fuse()``) before export where the model has it.
"""
from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .checkpoint import atomic_save, unwrap_features_only

__all__ = ["FORMATS", "check_export", "export_model", "export_program", "load_exported", "save_program"]

FORMATS = ("onnx", "torch-export")


def _dynamic_shapes(min_size: int, max_size: int, stride: int) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    def side(name: str) -> Any:
        return stride * Dim(name, min=max(1, -(-min_size // stride)), max=max_size // stride)

    return {"x": {0: Dim("batch", min=1, max=1024), 2: side("height_blocks"), 3: side("width_blocks")}}


def _example(model: nn.Module, size: Sequence[int]) -> torch.Tensor:
    in_chans = getattr(unwrap_features_only(model), "in_chans", 3)
    return torch.randn(2, in_chans, *size)


def export_program(
    model: nn.Module,
    *,
    example_size: Sequence[int] = (224, 224),
    min_size: int = 64,
    max_size: int = 4096,
    stride: int = 32,
) -> torch.export.ExportedProgram:
    """Trace a copy of ``model`` (eval mode, BatchNorm folded) with dynamic batch and image size.

    Args:
        model: the model; inputs ``(B, C, H, W)``. It is not modified.
        example_size: image size used for tracing (multiples of ``stride``).
        min_size, max_size, stride: the program accepts any batch size and any height and width
            in ``[min_size, max_size]`` that are multiples of ``stride`` (the model's total
            stride, 32 for MLLA: such sizes need no padding inside the network, so the graph has
            no size-dependent branches).
    """
    if any(s % stride for s in example_size):
        raise ValueError(f"example size {tuple(example_size)} must be a multiple of {stride}")
    model = copy.deepcopy(model).eval()
    target = unwrap_features_only(model)
    if hasattr(target, "fuse"):
        target.fuse()
    with torch.no_grad():
        return torch.export.export(model, (_example(model, example_size),), dynamic_shapes=_dynamic_shapes(min_size, max_size, stride))


def save_program(program: torch.export.ExportedProgram, output: str | os.PathLike, fmt: str = "onnx", opset: int = 18) -> Path:
    """Write ``program`` atomically as ONNX (``fmt='onnx'``) or as a ``torch.export`` ``.pt2`` file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if fmt == "torch-export":
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), output)
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=["x"], verbose=False)
    return atomic_save(lambda tmp: onnx_program.save(tmp, external_data=False), output)


def export_model(model: nn.Module, output: str | os.PathLike, fmt: str = "onnx", **kwargs: Any) -> Path:
    """:func:`export_program` then :func:`save_program`; ``kwargs`` go to :func:`export_program`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    return save_program(export_program(model, **kwargs), output, fmt)


def load_exported(path: str | os.PathLike, fmt: str | None = None) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A callable ``x -> [outputs]`` running an exported file (ONNX Runtime or the program)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    fmt = fmt or ("onnx" if path.suffix == ".onnx" else "torch-export")
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]

        return run_onnx
    module = torch.export.load(str(path)).module()

    def run_program(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = module(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return run_program


def check_export(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[Sequence[int]],
    batch_size: int = 2,
    fmt: str | None = None,
) -> dict[str, float]:
    """Largest absolute difference between the exported file and ``model`` at each size."""
    run = load_exported(path, fmt)
    model = model.eval()
    diffs = {}
    for size in sizes:
        x = torch.randn(batch_size, getattr(unwrap_features_only(model), "in_chans", 3), *size)
        with torch.no_grad():
            ref = model(x)
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        outs = run(x)
        if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
            raise RuntimeError(f"exported model gives shapes {[tuple(o.shape) for o in outs]} at {tuple(size)}, "
                               f"PyTorch gives {[tuple(r.shape) for r in refs]}")
        diffs[f"{size[0]}x{size[1]}"] = max((o - r).abs().max().item() for o, r in zip(outs, refs))
    return diffs
