"""MLLA's attention alone: the fused Triton kernel against the PyTorch form (eager and compiled),
at the token counts of each MLLA-T stage, forward and forward + backward, with the achieved
memory bandwidth against the card's peak.

    .venv/bin/python benchmarks/attention_kernel.py --device cuda
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/attention_kernel.py --device cpu --cases 32:1 --rounds 1  # logic check

A case ``SIZE:BATCH`` runs the four stages of an MLLA-T image of ``SIZE x SIZE`` pixels (grids
SIZE/4 .. SIZE/32, heads 2-4-8-16 of dim 32); every form of a (case, stage, dtype, pass) is
timed interleaved in rounds, medians reported; the fused kernel gets the grid's width, as the
model passes it. Bandwidth: the bytes a single pass over the tensors must move (forward: read q,
k, v, write the output; backward adds: read q, k, v and the output's gradient, write their
gradients; the RoPE tables' distinct angles once), divided by the median time; against the
card's nominal peak (``--peak-gbs``, or a known card's data sheet) and against a measured
device-to-device copy. Writes ``attention_kernel.csv``, ``.json`` and ``.md`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from mlla.benchmark import DTYPES, environment, time_call, time_interleaved
from mlla.checkpoint import atomic_save
from mlla.ops import attention_backend, rope_2d_head_tables
from mlla.ops.mlla_attn import mlla_attention, mlla_attention_torch
from mlla.ops.mlla_attn.backend import interpreter_requested

#: MLLA-T: channels and heads of the four stages (head dim 32), stride of stage 1.
STAGES = ((64, 2), (128, 4), (256, 8), (512, 16))
#: Nominal memory bandwidth (GB/s) of data-center cards, from their data sheets; matched by name.
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "A100-SXM4-80GB": 2039.0,
            "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "L40S": 864.0, "A10": 600.0, "L4": 300.0}
#: ``fused_b64``: the kernel with 64-token blocks in its token-block passes (CUDA only; the default is
#: ``kernel.TOKEN_BLOCK_N_GPU``), to compare the setting in the same rounds.
FORMS = ("torch", "torch_compiled", "fused", "fused_b64")
COLUMNS = ["case", "stage", "grid", "tokens", "batch", "heads", "dtype", "pass", "form", "ms", "ms_min", "ms_max",
           "gbytes", "gbs", "pct_peak", "pct_copy", "speedup_vs_torch", "max_rel_err_vs_torch", "rounds", "calls",
           "device", "gpu", "torch"]


def nominal_peak_gbs(device: torch.device, override: float | None) -> float | None:
    """``override``, else the data-sheet bandwidth of a known card (None elsewhere)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def copy_gbs(device: torch.device, mib: int) -> float:
    """Bandwidth of a device-to-device copy of ``mib`` MiB (read + write), the practical ceiling."""
    src = torch.empty(mib << 18, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(time_call(lambda: dst.copy_(src), device, 5) for _ in range(5))
    return 2 * src.numel() * 4 / t / 1e9


def stage_inputs(batch: int, grid: tuple[int, int], dim: int, heads: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    N, d = grid[0] * grid[1], dim // heads
    qk = torch.randn(batch, N, 2, heads, d, generator=g).to(device, dtype)
    v = torch.randn(batch, N, heads, d, generator=g).to(device, dtype)
    cos, sin = rope_2d_head_tables(*grid, dim, heads, device=device)
    return qk, v, cos, sin


def pass_bytes(qk: torch.Tensor, cos: torch.Tensor, grid: tuple[int, int], backward: bool) -> int:
    """Bytes a single pass must move: activations in the input dtype, and the distinct angles of the
    RoPE tables once (their first column and first row, ``H + W`` of their ``N`` rows: every angle
    of a 2-d RoPE table is a row's or a column's, which the fused kernel reads given the width)."""
    act = qk.numel() // 2 * qk.element_size()  # one (B, N, C) tensor
    tables = 2 * cos.shape[0] * (grid[0] + grid[1]) * cos.shape[2] * cos.element_size()
    return (4 + (8 if backward else 0)) * act + tables  # fwd: q, k, v, out; bwd: q, k, v, dout, dq, dk, dv, +out


def make_call(form: str, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
              compiled: Callable | None, width: int) -> Callable[[], torch.Tensor]:
    """One call of ``form``; the fused kernel gets the grid's ``width``, as the model passes it."""
    fused = functools.partial(mlla_attention, width=width)

    def fused_b64(*args):
        from mlla.ops.mlla_attn import kernel

        default, kernel.TOKEN_BLOCK_N_GPU = kernel.TOKEN_BLOCK_N_GPU, 64
        try:
            return fused(*args)
        finally:
            kernel.TOKEN_BLOCK_N_GPU = default
    fn = {"torch": mlla_attention_torch, "torch_compiled": compiled, "fused": fused, "fused_b64": fused_b64}[form]
    if not backward:
        def call() -> torch.Tensor:
            with torch.no_grad(), attention_backend("triton" if form.startswith("fused") else "torch"):
                return fn(qk, v, cos, sin)
        return call
    qk_g, v_g = qk.detach().requires_grad_(), v.detach().requires_grad_()
    grad = torch.randn(qk.shape[0], qk.shape[1], qk.shape[3], qk.shape[4], device=qk.device, dtype=qk.dtype)

    def call() -> torch.Tensor:
        with attention_backend("triton" if form.startswith("fused") else "torch"):
            out = fn(qk_g, v_g, cos, sin)
        out.backward(grad)
        qk_g.grad = v_g.grad = None
        return out
    return call


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    env = environment(args.device)
    peak = nominal_peak_gbs(device, args.peak_gbs)
    copy = copy_gbs(device, args.copy_mib)
    forms = [f for f in FORMS if (f != "torch_compiled" or args.compile) and (f != "fused_b64" or device.type == "cuda")]
    compiled = torch.compile(mlla_attention_torch, dynamic=True) if args.compile else None
    rows: list[dict[str, Any]] = []
    for case in args.cases:
        size, batch = (int(t) for t in case.split(":"))
        for stage, (dim, heads) in enumerate(STAGES):
            grid = (max(1, size // (4 << stage)),) * 2
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                qk, v, cos, sin = stage_inputs(batch, grid, dim, heads, dtype, device)
                with torch.no_grad(), attention_backend("triton"):
                    err = ((mlla_attention(qk, v, cos, sin, width=grid[1]).double() - mlla_attention_torch(qk, v, cos, sin).double()).abs().max()
                           / mlla_attention_torch(qk, v, cos, sin).double().abs().max()).item()
                for backward in (False, True):
                    calls = {f: make_call(f, qk, v, cos, sin, backward, compiled, grid[1]) for f in forms}
                    times, per_round = time_interleaved(calls, device, rounds=args.rounds, warmup=args.warmup,
                                                min_round_s=args.min_round_s)
                    gbytes = pass_bytes(qk, cos, grid, backward) / 1e9
                    base = statistics.median(times["torch"])
                    for f in forms:
                        median = statistics.median(times[f])
                        gbs = gbytes / median
                        rows.append(dict(
                            case=f"{size}px b{batch}", stage=stage + 1, grid=f"{grid[0]}x{grid[1]}", tokens=grid[0] * grid[1],
                            batch=batch, heads=heads, dtype=dtype_name, **{"pass": "fwd+bwd" if backward else "fwd"}, form=f,
                            ms=1e3 * median, ms_min=1e3 * min(times[f]), ms_max=1e3 * max(times[f]), gbytes=gbytes, gbs=gbs,
                            pct_peak=None if peak is None else 100 * gbs / peak, pct_copy=100 * gbs / copy,
                            speedup_vs_torch=base / median, max_rel_err_vs_torch=err if f.startswith("fused") else 0.0,
                            rounds=args.rounds, calls=per_round[f], device=env["device"], gpu=env.get("gpu", env["cpu"]),
                            torch=env["torch"],
                        ))
                        r = rows[-1]
                        print(f"{r['case']} stage {r['stage']} {r['grid']} {dtype_name} {r['pass']:>7} {f:>14}: {r['ms']:.3f} ms, "
                              f"{gbs:.0f} GB/s, {r['speedup_vs_torch']:.2f}x", flush=True)
                    del calls
    for r in rows:
        r["copy_gbs"], r["nominal_peak_gbs"] = copy, peak
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| case | stage | grid | dtype | pass | form | ms | GB/s | % peak | % copy | vs PyTorch |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(f"| {r['case']} | {r['stage']} | {r['grid']} | {r['dtype']} | {r['pass']} | {r['form']} | {r['ms']:.3f} | "
                     f"{r['gbs']:.0f} | {f(r['pct_peak'], '.0f')} | {r['pct_copy']:.0f} | {r['speedup_vs_torch']:.2f}x |")
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], out_dir: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + ["copy_gbs", "nominal_peak_gbs"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), out_dir / "attention_kernel.csv")
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)), out_dir / "attention_kernel.json")
    atomic_save(lambda tmp: Path(tmp).write_text(table(rows) + "\n"), out_dir / "attention_kernel.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (a logic check, not speed)")
    p.add_argument("--cases", nargs="+", default=["224:128", "1024:4"], help="SIZE:BATCH (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled PyTorch form")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-round-s", type=float, default=0.02, help="repeat calls within a round up to this time")
    p.add_argument("--peak-gbs", type=float, help="the card's nominal memory bandwidth in GB/s (default: known cards)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures practical bandwidth")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "gpu"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (on a CPU: --device cpu with TRITON_INTERPRET=1)")
    if not args.device.startswith("cuda") and not interpreter_requested():
        raise SystemExit("the kernel runs on CUDA; on the CPU set TRITON_INTERPRET=1 (Triton's interpreter: a logic check)")
    rows = run(args)
    write(rows, Path(args.output_dir))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
