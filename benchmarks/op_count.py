"""How many PyTorch operators one forward pass dispatches, per model: on a GPU every one is (at
least) a kernel launch from Python, so a model with many small operators is bound by the CPU that
launches them until the batch is large (see the README's GPU section).

    .venv/bin/python benchmarks/op_count.py                # a few seconds on a CPU; writes benchmarks/results/op_count/
    .venv/bin/python benchmarks/op_count.py --mode train   # a training step: writes op_count_train.{json,md} there
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/op_count.py --mode train --models mlla_tiny --attention-backend triton
        # MLLA's attention as the fused kernel (in Triton's CPU interpreter without CUDA): op_count_train_triton.{json,md}

Counts every ATen operator call (views included: each costs dispatch time on the CPU), counted
by a ``TorchDispatchMode``, after a first call: ``infer``, one ``eval`` forward at 224x224, batch
1, under ``torch.no_grad``, with MLLA on its plain path (the one CUDA runs: no CPU fused-inference
path); ``train``, one training step's forward under bfloat16 autocast, cross-entropy and
backward, batch 2, with MLLA's attention in its PyTorch form, or with ``--attention-backend triton``
as the fused kernel, whose Triton launches are counted beside the ATen operators. The script runs
the kernel in Triton's CPU interpreter, which launches what a GPU does; only the ATen ``sum`` that
adds the kernel's partial sums (one per pass) can differ: the interpreter always splits the tokens
in two chunks, a GPU where the batch does not fill it. Autocast's casts are the ``_to_copy`` column.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import timm
import torch
from tqdm import tqdm
from torch.utils._python_dispatch import TorchDispatchMode

import mlla  # registers the models
import mlla.ops
from mlla.ops.mlla_attn.backend import interpreter_requested
from mlla.checkpoint import atomic_save

MODELS = ["mlla_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny", "vit_small_patch16_224", "mambaout_tiny"]
#: ATen operators that return views (no kernel launch on a GPU); ``chunk``, ``contiguous`` and
#: ``reshape`` reach the profiler, not the dispatcher (their views or copies do).
VIEWS = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
         "as_strided", "unbind", "split", "reshape", "alias", "detach", "chunk", "contiguous"}


class _CountOps(TorchDispatchMode):
    active: list["_CountOps"] = []  # the counts being taken (innermost last)

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = 0

    def __enter__(self) -> "_CountOps":
        _CountOps.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _CountOps.active.pop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(name: str, size: int = 224) -> Counter[str]:
    """ATen operator calls of one eval forward of ``name`` at ``size`` x ``size``, batch 1, after a
    first forward (what every later call dispatches: MLLA's RoPE tables are cached by then)."""
    model = timm.create_model(name).eval()
    if hasattr(model, "set_fused_inference"):
        model.set_fused_inference(False)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)
        with _CountOps() as mode:
            model(x)
    return mode.counts


def count_train_ops(name: str, size: int = 224) -> Counter[str]:
    """ATen operator calls of one training step of ``name`` (forward under bfloat16 autocast,
    cross-entropy, backward) at ``size`` x ``size``, batch 2, after a first step."""
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x, y = torch.randn(2, 3, size, size), torch.randint(0, model.num_classes, (2,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    with _CountOps() as mode:
        step()
    return mode.counts


#: Key of the fused attention's Triton launches in a count (not an ATen operator).
LAUNCHES = "triton launches"


@contextlib.contextmanager
def _kernel_launches_counted():
    """Inside: each launch of the fused attention's Triton kernels (``kernel[grid](...)``, which calls
    the kernel's ``run``) made while a :class:`_CountOps` counts is counted under :data:`LAUNCHES`."""
    from mlla.ops.mlla_attn import kernel

    jits = [getattr(kernel, name) for name in ("_kv_kernel", "_out_kernel", "_bwd_q_kernel", "_bwd_kv_kernel")]
    for jit in jits:
        jit.run = _counted(jit.run)  # an instance attribute over the class's method
    try:
        yield
    finally:
        for jit in jits:
            del jit.run


def _counted(run):
    def counted(*args, **kwargs):
        if not _CountOps.active:
            return run(*args, **kwargs)
        mode = _CountOps.active[-1]
        mode.counts[LAUNCHES] += 1
        mode.paused += 1  # Triton's CPU interpreter copies the arguments with ATen operators: not the model's
        try:
            return run(*args, **kwargs)
        finally:
            mode.paused -= 1

    return counted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--mode", choices=("infer", "train"), default="infer", help="an eval forward, or a training step")
    p.add_argument("--attention-backend", choices=("torch", "triton"), default="torch",
                   help="MLLA's attention in PyTorch (default) or as the fused kernel (Triton's CPU interpreter without CUDA)")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "op_count"))
    args = p.parse_args(argv)
    train, kernel = args.mode == "train", args.attention_backend == "triton"
    if kernel and not interpreter_requested():
        p.error("--attention-backend triton counts on the CPU, in Triton's interpreter: run the script with TRITON_INTERPRET=1 "
                "(Triton reads it when first imported, which importing timm does)")
    mlla.ops.set_attention_backend(args.attention_backend)
    rows = []
    for name in tqdm(args.models, desc="count", unit="model"):  # minutes per model with the kernel in Triton's interpreter
        with _kernel_launches_counted() if kernel else contextlib.nullcontext():
            counts = count_train_ops(name) if train else count_ops(name)
        launches = counts.pop(LAUNCHES, 0)
        views = sum(n for op, n in counts.items() if op in VIEWS)
        rows.append(dict(model=name, ops=sum(counts.values()), views=views, compute_ops=sum(counts.values()) - views,
                         **(dict(casts=counts["_to_copy"]) if train else {}),
                         **(dict(triton_launches=launches) if kernel else {}), top=dict(counts.most_common(12))))
    head = ["model", f"ATen ops per {'training step' if train else 'forward'}", "of which views", "other ops"]
    head += ["of which casts (`_to_copy`, mostly autocast's)"] if train else []
    head += ["Triton launches"] if kernel else []
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in ("model", "ops", "views", "compute_ops", "casts", "triton_launches") if k in r)
              + " |" for r in rows]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("op_count_train" if train else "op_count") + ("_triton" if kernel else "")
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)), out / f"{stem}.json")
    atomic_save(lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), out / f"{stem}.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
