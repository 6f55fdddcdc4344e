"""CPU training steps with the C library's allocator as configured against freed memory kept for
reuse (:func:`mlla.runtime.retain_freed_memory`), in alternating processes.

The allocator is a setting of a whole process that cannot be undone in it, so the two cannot be
timed in one process; instead each round starts one process per setting, in alternating order
(default first in odd rounds, retain first in even ones), and each process times ``--steps``
training steps (forward, cross-entropy, backward, AdamW step: ``benchmarks/train_throughput.py``'s
step) after ``--warmup`` untimed ones. Reported: the median over rounds of each process's median
step, images per second, the ratio, and the processes' peak resident memory (retaining freed
memory keeps the process at its largest working set).

    .venv/bin/python benchmarks/cpu_allocator.py      # MLLA-T, 224 px, batch 32, fp32, 3 rounds: about 6 minutes

Writes ``OUT/cpu_allocator.{csv,json,md}`` (default ``benchmarks/results/cpu_allocator``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build, step  # noqa: E402  (the same training step)

from mlla.checkpoint import atomic_save  # noqa: E402
from mlla.runtime import retain_freed_memory  # noqa: E402

ALLOCATORS = ("default", "retain")


def worker(args: argparse.Namespace) -> dict:
    """One process's measurement: its step times (s) and peak resident memory (MiB)."""
    torch.set_num_threads(args.threads)
    if args.worker == "retain" and not retain_freed_memory():
        raise SystemExit("retain_freed_memory() could not be applied here (needs glibc on Linux)")
    model, optimizer, x, y = build(args, torch.device("cpu"))
    for _ in range(args.warmup):
        step(model, optimizer, x, y, args.amp)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, optimizer, x, y, args.amp)
        times.append(time.perf_counter() - start)
    return dict(step_s=times, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_worker(args: argparse.Namespace, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", allocator, "--model", args.model, "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--amp"] if args.amp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {allocator} process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(args: argparse.Namespace, runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for allocator in ALLOCATORS:
        medians = [statistics.median(r["step_s"]) for r in runs[allocator]]
        step_s = statistics.median(medians)
        rows.append(dict(model=args.model, img_size=args.img_size, batch_size=args.batch_size, amp=args.amp,
                         threads=args.threads, allocator=allocator, rounds=len(medians), step_s_median=step_s,
                         img_per_s=args.batch_size / step_s, img_per_s_rounds=[args.batch_size / m for m in medians],
                         peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in runs[allocator])))
    for row in rows:
        row["speed_vs_default"] = row["img_per_s"] / rows[0]["img_per_s"]
        row["memory_vs_default"] = row["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    return rows


def write(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(dict(meta=meta, results=rows), indent=1)), out / "cpu_allocator.json")

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "img_per_s_rounds"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_save(write_csv, out / "cpu_allocator.csv")
    lines = ["| model | size | batch | allocator | img/s (median of rounds) | each round | vs default | peak RSS MiB | vs default |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['img_size']} | {r['batch_size']} | {r['allocator']} | {r['img_per_s']:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in r['img_per_s_rounds'])} | {r['speed_vs_default']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} | {r['memory_vs_default']:.2f}x |" for r in rows]
    lines.append(f"\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}; {meta['steps']} timed steps per "
                 f"process after {meta['warmup']} untimed; `{meta['command']}`")
    atomic_save(lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), out / "cpu_allocator.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlla_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=3, help="processes per allocator")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "cpu_allocator"))
    p.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    runs: dict[str, list[dict]] = {a: [] for a in ALLOCATORS}
    for r in range(args.rounds):
        for allocator in (ALLOCATORS if r % 2 == 0 else ALLOCATORS[::-1]):
            runs[allocator].append(run_worker(args, allocator))
            speed = args.batch_size / statistics.median(runs[allocator][-1]["step_s"])
            print(f"round {r + 1}/{args.rounds} {allocator:<8} {speed:6.2f} img/s", flush=True)
    rows = summarize(args, runs)
    meta = dict(machine=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                warmup=args.warmup, steps=args.steps, command=" ".join(["python benchmarks/cpu_allocator.py", *(argv or sys.argv[1:])]))
    write(rows, Path(args.output_dir), meta)
    for row in rows:
        print(f"{row['allocator']:<8} {row['img_per_s']:6.2f} img/s ({row['speed_vs_default']:.2f}x), "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB ({row['memory_vs_default']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
