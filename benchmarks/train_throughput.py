"""Training throughput (images/s) and peak memory per step, with and without gradient checkpointing.

One training step = forward, cross-entropy, backward, AdamW step (timm's optimizer factory, as
``mlla train``). The two modes are timed interleaved in one process, ``--repeats`` times, and
the medians reported. Peak memory: on GPU ``torch.cuda.max_memory_allocated`` per step; on CPU
the peak resident set size of a fresh process running one step, minus its size just before it
(model and input allocated; the step adds activations, gradients and AdamW's state), measured
in a subprocess per mode.

    .venv/bin/python benchmarks/train_throughput.py                       # MLLA-T, 224 px, batch 32, CPU
    .venv/bin/python benchmarks/train_throughput.py --device cuda --batch-size 128

Writes ``OUT.csv`` and ``OUT.json`` (default benchmarks/results/train_throughput).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import mlla

MODES = {"plain": False, "grad_checkpointing": True}


def build(args: argparse.Namespace, device: torch.device) -> tuple:
    torch.manual_seed(0)
    model = mlla.create_model(args.model, num_classes=1000).to(device).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    return model, optimizer, x, y


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cpu_peak_memory(args: argparse.Namespace, mode: str) -> float:
    """Peak resident memory (MiB) added by training steps, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--_memory-probe", mode, "--model", args.model, "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)] + (["--amp"] if args.amp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def memory_probe(args: argparse.Namespace) -> None:
    model, optimizer, x, y = build(args, torch.device("cpu"))
    model.set_grad_checkpointing(MODES[args._memory_probe])
    before = rss_mib()
    step(model, optimizer, x, y, args.amp)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(peak - before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlla_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/train_throughput")
    p.add_argument("--_memory-probe", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory_probe:
        memory_probe(args)
        return

    device = torch.device(args.device)
    model, optimizer, x, y = build(args, device)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    peaks: dict[str, list[float]] = {m: [] for m in MODES}
    for mode, on in MODES.items():
        model.set_grad_checkpointing(on)
        for _ in range(args.warmup):
            step(model, optimizer, x, y, args.amp)
    for r in range(args.repeats):
        for mode, on in MODES.items():  # interleaved: machine load drifts hit both alike
            model.set_grad_checkpointing(on)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer, x, y, args.amp)
            sync(device)
            times[mode].append((time.perf_counter() - t) / args.steps)
            if device.type == "cuda":
                peaks[mode].append(torch.cuda.max_memory_allocated(device) / 2**20)
            print(f"repeat {r + 1}/{args.repeats} {mode}: {args.batch_size / times[mode][-1]:.2f} img/s", flush=True)
    if device.type == "cpu":
        peaks = {m: [cpu_peak_memory(args, m)] for m in MODES}

    rows = []
    for mode in MODES:
        median = statistics.median(times[mode])
        rows.append(dict(
            model=args.model, img_size=args.img_size, batch_size=args.batch_size, device=args.device,
            threads=args.threads if device.type == "cpu" else None, amp=args.amp, mode=mode,
            step_s_median=median, img_per_s=args.batch_size / median, peak_mem_mib=statistics.median(peaks[mode]),
            step_s_all=times[mode],
        ))
    base = rows[0]
    for row in rows:
        row["speed_vs_plain"] = row["img_per_s"] / base["img_per_s"]
        row["memory_vs_plain"] = row["peak_mem_mib"] / base["peak_mem_mib"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                memory="torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS added by a step (fresh process)")
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "step_s_all"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{args.model} {args.img_size}px batch {args.batch_size} on {args.device}"
          f"{f' ({args.threads} threads)' if device.type == 'cpu' else ''}, medians of {args.repeats}:")
    for row in rows:
        print(f"  {row['mode']:<20} {row['img_per_s']:8.2f} img/s ({row['speed_vs_plain']:.2f}x)  "
              f"peak memory {row['peak_mem_mib']:8.0f} MiB ({row['memory_vs_plain']:.2f}x)")
    print(f"written {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
