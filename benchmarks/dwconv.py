"""MLLA's depthwise 3x3 convolutions (CPE, the block's DWConv, LePE: four per block) at the model's
shapes, in each memory layout and implementation PyTorch offers, forward and forward + backward.

    python benchmarks/dwconv.py --device cuda                        # MLLA-T's four stages, 224 px, batch 128
    python benchmarks/dwconv.py --device cpu --batch 2 --size 64 --rounds 1 --output-dir /tmp/dw   # logic check

The model holds its activations as channels-last tokens ``(B, H, W, C)``. Forms, each from such
tokens to such tokens:

* ``channels_last``: the convolution on the channels-last NCHW view (the model's path, cuDNN on CUDA);
* ``nchw_copy``: copied to contiguous NCHW, convolved, copied back (the copies counted);
* ``nchw_native``: the same with cuDNN off (PyTorch's own depthwise kernel, CUDA only);
* ``nchw_only``: contiguous NCHW in and out, no copies (a lower bound of what a layout change can give).

Every form of a (stage, dtype, pass) is timed interleaved in rounds, medians reported. Writes
``dwconv.csv`` and ``dwconv.md`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mlla.benchmark import DTYPES, environment, time_interleaved
from mlla.checkpoint import atomic_save
from mlla.layers.conv import channels_last_kernel

STAGE_CHANNELS = (64, 128, 256, 512)  # MLLA-T; stage s has grid size / 4 / 2**s


def _forms(x_tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    C = weight.shape[0]
    w_cl = channels_last_kernel(weight)  # as the model's convolutions mark their kernels

    def channels_last(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.permute(0, 3, 1, 2), w_cl, bias, padding=1, groups=C).permute(0, 2, 3, 1)

    def nchw_copy(t: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(t.permute(0, 3, 1, 2).contiguous(), weight, bias, padding=1, groups=C)
        return y.permute(0, 2, 3, 1).contiguous()

    def nchw_native(t: torch.Tensor) -> torch.Tensor:
        with torch.backends.cudnn.flags(enabled=False):
            return nchw_copy(t)

    def nchw_only(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, weight, bias, padding=1, groups=C)

    forms = dict(channels_last=channels_last, nchw_copy=nchw_copy, nchw_only=nchw_only)
    if x_tokens.is_cuda:
        forms["nchw_native"] = nchw_native
    return forms


def run(device: torch.device, size: int, batch: int, dtypes: list[str], rounds: int) -> list[dict]:
    rows = []
    for stage, C in enumerate(STAGE_CHANNELS):
        grid = size // 4 // 2 ** stage
        for dtype in dtypes:
            dt = DTYPES[dtype]
            tokens = torch.randn(batch, grid, grid, C, device=device, dtype=dt)
            nchw = tokens.permute(0, 3, 1, 2).contiguous()
            weight = torch.randn(C, 1, 3, 3, device=device, dtype=dt, requires_grad=True)
            bias = torch.randn(C, device=device, dtype=dt, requires_grad=True)
            forms = _forms(tokens, weight, bias)
            for pass_ in ("fwd", "fwd+bwd"):
                steps = {}
                for name, fn in forms.items():
                    x = (nchw if name == "nchw_only" else tokens).detach().requires_grad_(pass_ == "fwd+bwd")

                    def step(fn=fn, x=x) -> None:
                        if pass_ == "fwd":
                            with torch.no_grad():
                                fn(x)
                        else:
                            out = fn(x)
                            out.backward(torch.ones_like(out))
                    steps[name] = step
                times, calls = time_interleaved(steps, device, rounds=rounds, warmup=2, min_round_s=0.05)
                base = statistics.median(times["channels_last"])
                for name, ts in times.items():
                    ms = 1e3 * statistics.median(ts)
                    rows.append(dict(stage=stage + 1, channels=C, grid=grid, batch=batch, dtype=dtype, pass_=pass_, form=name,
                                     ms=round(ms, 4), speedup_vs_channels_last=round(1e3 * base / ms, 3), rounds=rounds,
                                     calls=calls[name]))
                    print(f"stage {stage + 1} {dtype} {pass_:<8} {name:<14} {ms:8.3f} ms", flush=True)
    return rows


def render(rows: list[dict], env: dict, command: str) -> str:
    head = ["stage", "C", "grid", "dtype", "pass", "form", "ms", "vs channels_last"]
    lines = [f"# Depthwise 3x3 at MLLA-T's shapes ({env.get('gpu', env.get('cpu'))}, torch {env['torch']})", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['channels']} | {r['grid']} | {r['dtype']} | {r['pass_']} | {r['form']} | "
                     f"{r['ms']:.3f} | {r['speedup_vs_channels_last']:.2f}x |")
    return "\n".join(lines + ["", f"Command: `{command}`"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results" / "gpu" / "dwconv")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, args.size, args.batch, args.dtypes, args.rounds)
    env = environment(args.device)
    command = "python benchmarks/dwconv.py" + (" " + " ".join(argv) if argv else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def write_csv(tmp: str) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        Path(tmp).write_text(buf.getvalue())
    atomic_save(write_csv, args.output_dir / "dwconv.csv")
    atomic_save(lambda tmp: Path(tmp).write_text(render(rows, env, command)), args.output_dir / "dwconv.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
