"""Where a model's time goes on a GPU: kernel time by kind, beside the wall time of the call.

    python benchmarks/gpu_profile.py                      # on the GPU machine: MLLA-T, train and infer
    python benchmarks/gpu_profile.py --device cpu --size 64 --batch-size 2 --output-dir /tmp/prof   # logic check

For each (model, mode, attention backend), after warm-up, ``--calls`` calls of a training step
(forward and backward, ``--dtype`` autocast) or an inference batch run under ``torch.profiler``.
Per call it reports the wall time, the GPU's busy time (kernel durations summed), the number of
kernel launches, and the kernel time by kind, read from the kernels' names: depthwise
convolutions, other convolutions, matmuls, the fused attention's Triton kernels, other Triton
kernels (inductor), normalisation, elementwise and reductions, copies and layout changes, other.
Busy time far below wall time means the CPU that launches the kernels is the bottleneck (the
README's GPU section found eager MLLA-T so at small batches); the kinds say which kernels to fuse
or replace where the GPU is busy. On a CPU (the logic check) the "kernels" are ATen operators and
their self CPU time.

It also lists where the CPU's time goes: self time per profiled operator (ATen operators, autograd
nodes, Triton launches), the 15 largest per case. Writes ``gpu_profile.json`` and
``gpu_profile.md`` (one table of kinds, and per case the 12 longest kernels and the 15 largest CPU
operators) to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mlla.benchmark import BenchmarkSpec, Variant, _prepare, environment, make_step, synchronize
from mlla.checkpoint import atomic_save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_count import VIEWS  # noqa: E402

#: Kinds of kernel, first match wins: (kind, substrings of the lower-cased kernel name).
KINDS = (
    ("fused attention (ours)", ("_kv_kernel", "_out_kernel", "_bwd_q_kernel", "_bwd_kv_kernel")),
    ("triton (inductor)", ("triton_",)),
    ("depthwise convolution", ("depthwise", "dwconv", "conv_depthwise", "convolution_depthwise")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "addmm", "aten::mm", "bmm", "matmul", "nvjet")),
    ("normalisation", ("layer_norm", "layernorm", "batch_norm", "batchnorm")),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "transpose", "clone", "contiguous", "pad")),
    ("elementwise / reduction", ("elementwise", "vectorized", "unrolled", "reduce", "gelu", "silu", "exp", "mul",
                                 "add", "div", "sum", "mean", "sin", "cos", "clamp", "reciprocal", "sub", "where")),
)


def kind_of(name: str) -> str:
    """The kind of a kernel (or, on a CPU, of an ATen operator) from its name."""
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def _kernels(prof: profile, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel the profile saw (CPU: ATen operators but views, self time)."""
    if device.type == "cuda":
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.name.startswith("aten::") and e.name.removeprefix("aten::") not in VIEWS]


def profile_case(model_name: str, mode: str, attention: str, size: int, batch: int, dtype: str, device: torch.device,
                 warmup: int, calls: int) -> dict[str, Any]:
    """Profile ``calls`` calls of one case; figures per call."""
    spec = BenchmarkSpec([model_name], mode=mode, device=str(device), fuse=mode == "infer")
    model, x = _prepare(Variant(model_name, dtype, "eager", attention), spec, (size, size), batch, device)
    step = make_step(model, x, dtype, mode, attention)
    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(calls):
            t0 = time.perf_counter()
            step()
            synchronize(device)
            walls.append(time.perf_counter() - t0)
    kernels = _kernels(prof, device)
    by_kind: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    for name, us in kernels:
        by_kind[kind_of(name)] += us / 1e3 / calls
        by_name[name] += us / 1e3 / calls
    busy = sum(by_kind.values())
    wall = 1e3 * statistics.median(walls)
    # Where the CPU's time goes: self time per operator (ATen operators, autograd nodes, Triton launches), per call.
    cpu_ops = {e.key: (e.self_cpu_time_total / 1e3 / calls, e.count / calls) for e in prof.key_averages()}
    top_cpu = dict(sorted(cpu_ops.items(), key=lambda kv: -kv[1][0])[:15])
    return dict(model=model_name, mode=mode, attention=attention, size=size, batch=batch, dtype=dtype,
                wall_ms=wall, busy_ms=busy, busy_pct=100 * busy / wall if wall else None,
                launches=len(kernels) / calls, kinds_ms=dict(by_kind.most_common()),
                top_kernels_ms=dict(by_name.most_common(12)),
                cpu_self_ms=sum(ms for ms, _ in cpu_ops.values()),
                top_cpu_ops_ms={k: round(ms, 3) for k, (ms, _) in top_cpu.items()},
                top_cpu_ops_calls={k: n for k, (_, n) in top_cpu.items()})


def render(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    kinds = sorted({k for r in rows for k in r["kinds_ms"]}, key=lambda k: -max(r["kinds_ms"].get(k, 0) for r in rows))
    head = ["case", "wall ms", "busy ms", "busy %", "launches", *kinds]
    lines = [f"# Kernel time by kind ({env.get('gpu', env.get('cpu'))}, torch {env['torch']})", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        case = f"{r['model']} {r['mode']} {r['dtype']} b{r['batch']} {r['size']}px attention={r['attention']}"
        cells = [case, f"{r['wall_ms']:.1f}", f"{r['busy_ms']:.1f}", f"{r['busy_pct']:.0f}", f"{r['launches']:.0f}",
                 *(f"{r['kinds_ms'].get(k, 0.0):.1f}" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        lines += ["", f"**{r['model']} {r['mode']} attention={r['attention']}: longest kernels (ms per call)**", ""]
        lines += [f"- {ms:.2f} ms: `{name[:120]}`" for name, ms in r["top_kernels_ms"].items()]
        if "top_cpu_ops_ms" in r:
            lines += ["", f"CPU self time per call {r['cpu_self_ms']:.1f} ms (under the profiler, which adds its own), "
                          "largest by operator (ms per call, calls per call):", ""]
            lines += [f"- {ms:.2f} ms, {r['top_cpu_ops_calls'][name]:.0f} calls: `{name[:100]}`"
                      for name, ms in r["top_cpu_ops_ms"].items()]
    return "\n".join(lines + ["", f"Command: `{command}`"]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["mlla_tiny", "convnext_tiny"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--attention-backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton", "auto"],
                   help="MLLA models: one case per backend (others run once)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "tf32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results" / "gpu" / "gpu_profile")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (on a CPU: --device cpu, a logic check)")
    if device.type != "cuda" and "triton" in args.attention_backends:
        args.attention_backends = [a for a in args.attention_backends if a != "triton"] or ["torch"]
        print("no CUDA: the 'triton' attention case is left out (it runs on CUDA)", file=sys.stderr)
    rows = []
    for model in args.models:
        backends = args.attention_backends if model.startswith("mlla") else ["torch"]
        for mode in args.modes:
            for attention in backends:
                rows.append(profile_case(model, mode, attention, args.size, args.batch_size, args.dtype, device,
                                         args.warmup, args.calls))
                r = rows[-1]
                print(f"{model} {mode} {attention}: wall {r['wall_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, "
                      f"{r['launches']:.0f} launches", flush=True)
    env = environment(args.device)
    command = "python benchmarks/gpu_profile.py" + (" " + " ".join(argv) if argv else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(dict(env=env, rows=rows), indent=1)),
                args.output_dir / "gpu_profile.json")
    atomic_save(lambda tmp: Path(tmp).write_text(render(rows, env, command)), args.output_dir / "gpu_profile.md")
    print(render(rows, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
