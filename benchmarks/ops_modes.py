"""Time and peak memory of the unified operator's computation modes over token counts.

Modes (forward pass, ``B x N`` tokens, ``C`` channels in ``H`` heads, float32):

* ``parallel``: non-causal linear attention (no forget gate), ``q (k^T v)``;
* ``chunked``: causal with a forget gate, one decay per head (default chunk size);
* ``chunked-key``: causal with a forget gate per key channel (default chunk size), as the
  ``ablation_forget_gate`` model and Mamba;
* ``recurrent``: the token-by-token recurrence (forget gate per head), the reference.

Peak memory is the most bytes held by tensors created during the call: CUDA's allocator statistics
on a GPU, on the CPU a dispatch-mode count of live tensor storages. ``--cpu-time`` times with
the process's CPU clock instead of the wall clock: on a shared machine other jobs then do not
count (use it with ``--threads 1``). Writes ``ops_modes.csv`` and ``ops_modes.png`` to ``--out``
and prints a table::

    .venv/bin/python benchmarks/ops_modes.py --out benchmarks/results/ops_modes
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from mlla.checkpoint import atomic_save
from mlla.ops import gated_linear_attention

MODES = ("parallel", "chunked", "chunked-key", "recurrent")


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created by the operators run under this mode (any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors referring to it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.live[key][0]
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def make_call(mode: str, batch: int, tokens: int, dim: int, heads: int, device: torch.device) -> Callable[[], torch.Tensor]:
    d = dim // heads
    q, k, v = (torch.randn(batch, tokens, heads, d, device=device) for _ in range(3))
    decay_channels = d if mode == "chunked-key" else 1
    log_f = -0.1 * torch.rand(batch, tokens, heads, decay_channels, device=device)
    if mode == "parallel":
        return lambda: gated_linear_attention(q, k, v, kernel="elu+1")
    op_mode = "recurrent" if mode == "recurrent" else "chunked"
    return lambda: gated_linear_attention(q, k, v, kernel="elu+1", log_forget=log_f, causal=True, mode=op_mode)


def measure(
    call: Callable[[], torch.Tensor], device: torch.device, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """Median time (ms, by ``clock``) and peak memory (MiB) of ``call`` without autograd."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        call()  # warm-up
        for _ in range(repeats):
            sync()
            start = clock()
            call()
            sync()
            times.append((clock() - start) * 1e3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with LiveTensorBytes() as tracker:
                call()
            peak = tracker.peak
    return statistics.median(times), peak / 2**20


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            n = [r["tokens"] for r in pts]
            axes[0].loglog(n, [r["time_ms"] for r in pts], "o-", label=mode)
            axes[1].loglog(n, [r["peak_mib"] for r in pts], "o-", label=mode)
    for ax, ylabel in zip(axes, ("time per forward (ms, median)", "peak memory (MiB)")):
        ax.set_xlabel("tokens N (14x14 ... 128x128)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=120), path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ops_modes"), help="output directory")
    p.add_argument("--sides", type=int, nargs="+", default=[14, 28, 56, 96, 128], help="token grid sides")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=96, help="channels C")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--recurrent-max-side", type=int, default=128, help="largest grid side for the slow recurrence")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    p.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock, not the wall clock")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        raise SystemExit(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if args.cpu_time and args.device != "cpu":
        raise SystemExit("--cpu-time measures CPU work; use it with --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)

    points = [(s, m) for s in args.sides for m in args.modes if m != "recurrent" or s <= args.recurrent_max_side]
    rows = []
    for side, mode in tqdm(points, desc="ops modes", unit="point"):
        tokens = side * side
        t, mem = measure(make_call(mode, args.batch, tokens, args.dim, args.heads, device), device, args.repeats, clock)
        rows.append(dict(mode=mode, side=side, tokens=tokens, time_ms=round(t, 3), peak_mib=round(mem, 2),
                         peak_bytes_per_token=round(mem * 2**20 / tokens / args.batch, 1)))
    recurrent = {r["side"]: r["time_ms"] for r in rows if r["mode"] == "recurrent"}
    for r in rows:
        r["speedup_vs_recurrent"] = round(recurrent[r["side"]] / r["time_ms"], 1) if r["side"] in recurrent else ""

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "ops_modes.csv"

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_save(write_csv, csv_path)
    where = f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else device.type
    timing = "CPU time" if args.cpu_time else "wall time"
    title = f"gated linear attention modes: B={args.batch}, C={args.dim}, {args.heads} heads, {where}, {timing}"
    plot(rows, args.out / "ops_modes.png", title)

    print(title)
    print(f"{'mode':<12}{'grid':>9}{'tokens':>8}{'ms':>10}{'peak MiB':>10}{'B/token':>9}{'x recurrent':>12}")
    for r in rows:
        print(f"{r['mode']:<12}{str(r['side']) + 'x' + str(r['side']):>9}{r['tokens']:>8}{r['time_ms']:>10.2f}"
              f"{r['peak_mib']:>10.1f}{r['peak_bytes_per_token']:>9.0f}{str(r['speedup_vs_recurrent']):>12}")
    print(f"wrote {csv_path} and {args.out / 'ops_modes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
