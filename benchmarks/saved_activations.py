"""What a training step keeps for its backward pass, per image and by module: the activation memory
that sets peak training memory at large batches, measured on any machine.

    .venv/bin/python benchmarks/saved_activations.py                      # MLLA-T (both attention forms), Swin-T, ConvNeXt-T
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/saved_activations.py   # the fused kernel's form too, by Triton's interpreter
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/saved_activations.py --compiled --output-dir benchmarks/results/saved_activations_compiled

One forward in train mode under bfloat16 autocast (CPU) of a batch of one and of two 224 x 224
images, with ``torch.autograd.graph.saved_tensors_hooks`` recording every tensor autograd saves:
each storage counted once, under the innermost module that was running when it was saved (a leaf
module, or MLLA's attention; ``(block)`` is what an MLLA block's own ``forward`` saves between its
submodules: SiLU, the gate product). Batch two minus batch one is what each image adds; the rest
is fixed (autocast's bfloat16 copies of the weights, and the like). Per-image bytes times the
batch is what a training step holds at its peak, before the gradients. CPU autocast runs LayerNorm in bfloat16 where CUDA's runs it in
float32 (a LayerNorm's saved input is then twice as large on a GPU, for every model alike).

``--compiled``: what the step saves through ``torch.compile`` instead (as ``mlla train --compile``
runs it): the model is traced with inductor's decompositions and split into forward and backward
by inductor's partitioner (min-cut rematerialisation, which recomputes cheap pointwise results in
the backward rather than saving them), without generating code; the backward graph's inputs are
what is saved, each under the innermost module of the forward operator that made it.

Writes ``saved_activations.json`` and ``.md`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

import mlla  # noqa: F401  (registers the models)
from mlla.checkpoint import atomic_save
from mlla.ops import attention_backend
from mlla.ops.mlla_attn.backend import interpreter_requested

SWIN, CONVNEXT = "swin_tiny_patch4_window7_224", "convnext_tiny"


def saved_bytes(name: str, size: int, attention: str, batch: int) -> Counter[str]:
    """Bytes autograd saves in one bfloat16-autocast training forward of ``batch`` images, by module."""
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    stack = ["(model)"]

    def enter(module, args, label):
        stack.append(label)

    def leave(module, args, out):
        stack.pop()

    for path, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("MllaLinearAttention", "MllaBlock") or not any(True for _ in module.children()):
            label = "(block)" if kind == "MllaBlock" else path.split(".")[-1]
            module.register_forward_pre_hook(lambda m, a, label=label: enter(m, a, label))
            module.register_forward_hook(leave)
    seen: set[int] = set()
    by_module: Counter[str] = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_module[stack[-1]] += storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size)
    with attention_backend(attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    return by_module


def compiled_saved_bytes(name: str, size: int, attention: str, batch: int) -> Counter[str]:
    """Bytes the ``torch.compile``'d bfloat16-autocast training step of ``batch`` images saves for its
    backward, by module (see the module docstring; ``(model)``: operators outside any module, such
    as the transposed weights)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    torch.manual_seed(0)
    model = timm.create_model(name).train()
    forward_outputs: list[list[Any]] = []
    by_module: Counter[str] = Counter()

    def forward_compiler(gm: torch.fx.GraphModule, inputs: Any):
        forward_outputs.append(list(next(n for n in gm.graph.nodes if n.op == "output").args[0]))
        return make_boxed_func(gm.forward)

    def backward_compiler(gm: torch.fx.GraphModule, inputs: Any):
        saved = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
        # Backward graphs are made last forward first (at the backward); a forward's last outputs are what it saves.
        made_by = forward_outputs.pop()[-len(saved):]
        for node, placeholder in zip(made_by, saved):
            value = placeholder.meta.get("val")
            if isinstance(value, torch.Tensor):
                by_module[_module_label(getattr(node, "meta", {}).get("nn_module_stack"))] += value.numel() * value.element_size()
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    step = torch.compile(model, backend=backend)
    with attention_backend(attention):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(torch.randn(batch, 3, size, size))
        out.float().sum().backward()  # the backward graph is made (and counted) at the first backward
    return by_module


def _module_label(stack: dict[str, tuple[str, Any]] | None) -> str:
    """The label :func:`saved_bytes` gives the innermost module of a node's ``nn_module_stack``."""
    if not stack:
        return "(model)"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return "(block)" if kind.endswith("MllaBlock") else path.rstrip("]").split(".")[-1]


def measure(name: str, size: int, attention: str, compiled: bool = False) -> dict[str, Any]:
    """Per image (batch 2 minus batch 1) and fixed (weights' bfloat16 copies, BatchNorm statistics) MiB."""
    count = compiled_saved_bytes if compiled else saved_bytes
    one, two = count(name, size, attention, 1), count(name, size, attention, 2)
    mib = 2.0 ** 20
    per_image = Counter({k: (two[k] - one[k]) / mib for k in two})
    return dict(model=name, attention=attention, step="compiled" if compiled else "eager", size=size,
                activation_mib=sum(per_image.values()),
                fixed_mib=(2 * sum(one.values()) - sum(two.values())) / mib,
                by_module_mib={k: v for k, v in per_image.most_common() if v > 0})


def render(rows: list[dict[str, Any]], command: str) -> str:
    size = rows[0]["size"] if rows else 224
    lines = [f"# Saved for backward, per image (bfloat16 autocast, {size} x {size}, train mode)", "",
             "| model | attention | step | activations MiB/image | fixed MiB (weight copies) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['attention']} | {r['step']} | {r['activation_mib']:.1f} | {r['fixed_mib']:.1f} |")
    for r in rows:
        lines += ["", f"**{r['model']} ({r['attention']}, {r['step']})**, largest by module (MiB/image):", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in list(r["by_module_mib"].items())[:12]]
    return "\n".join(lines + ["", f"Command: `{command}`"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mlla_tiny", SWIN, CONVNEXT])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--compiled", action="store_true", help="the torch.compile'd step (inductor's partitioner) instead of eager")
    p.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results" / "saved_activations")
    args = p.parse_args(argv)
    rows = []
    variants = [(name, attention) for name in args.models
                for attention in (["torch", "triton"] if name.startswith("mlla") and interpreter_requested() else ["torch"])]
    for name, attention in tqdm(variants, desc="measure", unit="model"):  # minutes for the kernel in Triton's interpreter
        rows.append(measure(name, args.size, attention, args.compiled))
        tqdm.write(f"{name} {attention}: {rows[-1]['activation_mib']:.1f} MiB/image saved")
    command = "python benchmarks/saved_activations.py" + (" " + " ".join(argv) if argv else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)), args.output_dir / "saved_activations.json")
    atomic_save(lambda tmp: Path(tmp).write_text(render(rows, command)), args.output_dir / "saved_activations.md")
    print(render(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
