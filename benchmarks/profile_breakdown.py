"""Where MLLA-T's inference time goes, eager and compiled: a torch.profiler breakdown by kind of op.

One forward pass of each (after warm-up) under ``torch.profiler``, self CPU time summed into:
linear-layer matmuls (``aten::addmm``/``addmm_``/``mm``), the attention's batched matmuls
(``aten::bmm``), dense and depthwise convolutions (oneDNN), inductor's generated kernels
(compiled only) and everything else. The profiler's own total is the reference; wall-clock
speed comparisons belong to ``benchmarks/inference.py``, which interleaves rounds.

    python benchmarks/profile_breakdown.py            # MLLA-T, 224x224, batch 32, 2 threads

Writes ``benchmarks/results/profile/breakdown.md`` and ``breakdown.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from mlla.benchmark import ALLOCATORS, apply_allocator, build_model, environment
from mlla.checkpoint import atomic_save

MATMULS = {"aten::addmm", "aten::addmm_", "aten::mm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlla_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--allocator", choices=ALLOCATORS, default="default",
                   help="'retain' keeps freed memory in the heap (mlla.runtime.retain_freed_memory)")
    p.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/profile"))
    return p.parse_args(argv)


def breakdown(model: torch.nn.Module, x: torch.Tensor, warmup: int) -> dict[str, float]:
    """Self CPU milliseconds of one call of ``model(x)`` by kind of op (see the module docstring)."""
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    kinds: Counter[str] = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3
        if event.key in MATMULS:
            kinds["linear matmuls"] += ms
        elif event.key == "aten::bmm":
            kinds["attention bmm"] += ms
        elif event.key == "aten::mkldnn_convolution":
            depthwise = len(event.input_shapes) > 1 and len(event.input_shapes[1]) == 4 and event.input_shapes[1][1] == 1
            kinds["depthwise convolutions" if depthwise else "dense convolutions"] += ms
        elif event.key.startswith("graph_"):  # inductor kernels (enable_kernel_profile)
            kinds["inductor kernels"] += ms
        else:
            kinds["other"] += ms
    kinds["total"] = sum(kinds.values())
    return dict(kinds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_allocator(args.allocator, torch.device("cpu"))
    inductor_config.cpp.enable_kernel_profile = True  # name inductor's kernels in the profile
    model = build_model(args.model, (args.size, args.size)).eval()
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    columns = {"eager": breakdown(model, x, args.warmup), "compiled": breakdown(torch.compile(model), x, args.warmup)}
    rows = ["linear matmuls", "attention bmm", "dense convolutions", "depthwise convolutions", "inductor kernels", "other", "total"]
    env = environment("cpu")
    lines = [
        f"# {args.model} forward, {args.size}x{args.size}, batch {args.batch_size}: self CPU time by kind of op (ms)",
        "",
        (f"{env['cpu']}, {torch.get_num_threads()} threads; torch {torch.__version__}; allocator: {allocator}; "
         f"one profiled call after {args.warmup} warm-up calls."),
        "",
        "| kind | eager | compiled |",
        "|---|---|---|",
        *(f"| {r} | {columns['eager'].get(r, 0.0):.0f} | {columns['compiled'].get(r, 0.0):.0f} |" for r in rows),
        "",
        f"Command: `python benchmarks/profile_breakdown.py{' ' + ' '.join(argv) if argv else ''}`",
    ]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    text, data = "\n".join(lines) + "\n", json.dumps({"env": {**env, "allocator": allocator}, **columns}, indent=2)
    atomic_save(lambda tmp: Path(tmp).write_text(text), args.output_dir / "breakdown.md")
    atomic_save(lambda tmp: Path(tmp).write_text(data), args.output_dir / "breakdown.json")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
