"""UperNet forward time and peak memory: MLLA-T against timm's Swin-T and ConvNeXt-T backbones
under the same UperNet head (512 channels, FCN auxiliary head, 150 classes), eval mode, batch 1:

    .venv/bin/python benchmarks/dense_seg.py                              # CPU at 512x2048 (slow)
    .venv/bin/python benchmarks/dense_seg.py --sizes 256x512 --rounds 3   # an affordable CPU run
    .venv/bin/python benchmarks/dense_seg.py --device cuda --dtypes fp32 bf16

The models of one (size, dtype) group are timed in interleaved rounds (A B C A B C ...) in one
process and medians are reported, as :mod:`mlla.benchmark` does. Peak memory is the growth of one
call: on CUDA ``max_memory_allocated`` over the memory held before it; on CPU the growth of the
resident high-water mark (``VmHWM``), in a fresh process per model. Writes ``results.csv``,
``results.json``, ``table.md`` and ``dense_seg.png`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import timm
import torch

import mlla  # noqa: F401  (registers the models)
from mlla.benchmark import DTYPES, call_peak_memory_mib, environment, make_step, parse_size, time_interleaved
from mlla.checkpoint import atomic_save, unwrap_features_only
from mlla.tasks.segmentation.model import UperNet
from mlla.profiling import count_gmacs, count_params

SWIN, CONVNEXT = "swin_tiny_patch4_window7_224", "convnext_tiny"
COLUMNS = ["backbone", "height", "width", "dtype", "device", "ms", "ms_min", "ms_max", "ratio_to_mlla", "peak_mem_mib",
           "params_m", "gmacs", "rounds", "threads", "cpu", "gpu", "torch", "timm"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["mlla_tiny", SWIN, CONVNEXT])
    p.add_argument("--sizes", nargs="+", default=["512x2048"], help="HxW (default: 512x2048, ADE20K's test scale)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default: 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "dense_seg"))
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(backbone: str, size: tuple[int, int], device: str | None = None) -> UperNet:
    """UperNet (ADE20K setting) over timm's ``features_only`` ``backbone``, eval mode (moved to ``device``)."""
    kwargs = {"img_size": size} if backbone == SWIN else {}
    features = timm.create_model(backbone, features_only=True, **kwargs)
    target = unwrap_features_only(features)
    if hasattr(target, "fuse"):
        target.fuse()  # MLLA: BatchNorm folded into its convolutions (inference)
        if device is not None and not device.startswith("cpu"):
            target.set_fused_inference(False)  # the fused in-place block path is the CPU's; GPUs run the plain one
    model = UperNet(features, 150).eval()
    return model if device is None else model.to(device)


def peak_memory_mib(backbone: str, size: tuple[int, int], dtype: str, device: str) -> float:
    """Extra memory of one forward call, measured in this process (see the module docstring)."""
    dev = torch.device(device)
    model = build(backbone, size, device)
    return call_peak_memory_mib(make_step(model, torch.randn(1, 3, *size, device=dev), dtype, "infer"), dev)


def measure_memory(backbone: str, size: tuple[int, int], dtype: str, device: str, threads: int) -> float:
    if device.startswith("cuda"):
        return peak_memory_mib(backbone, size, dtype, device)
    payload = json.dumps(dict(backbone=backbone, size=list(size), dtype=dtype, device=device, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", payload], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {backbone} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    rows = []
    for size in (parse_size(s) for s in args.sizes):
        stats = {}
        for b in args.backbones:
            with torch.device("meta"):
                meta = build(b, size)
            stats[b] = dict(params_m=count_params(meta) / 1e6, gmacs=count_gmacs(meta, (3, *size)))
        for dtype in args.dtypes:
            x = torch.randn(1, 3, *size, device=device)
            steps = {b: make_step(build(b, size, args.device), x, dtype, "infer") for b in args.backbones}
            times, _ = time_interleaved(steps, device, rounds=args.rounds, warmup=args.warmup, progress=True,
                                        desc=f"{size[0]}x{size[1]} {dtype}")
            del steps
            gc.collect()
            base = statistics.median(times[args.backbones[0]])
            for b in args.backbones:
                ms = statistics.median(times[b])
                rows.append(dict(
                    backbone=b, height=size[0], width=size[1], dtype=dtype, device=args.device, ms=1e3 * ms,
                    ms_min=1e3 * min(times[b]), ms_max=1e3 * max(times[b]), ratio_to_mlla=ms / base,
                    peak_mem_mib=None if args.no_memory else measure_memory(b, size, dtype, args.device, args.threads),
                    rounds=args.rounds, cpu=env["cpu"], gpu=env.get("gpu", ""), torch=env["torch"], timm=env["timm"],
                    threads=env["threads"], **stats[b],
                ))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backbone (UperNet) | size | dtype | device | ms (median) | x MLLA-T time | peak MiB | params (M) | GMACs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['backbone']} | {r['height']}x{r['width']} | {r['dtype']} | {r['device']} | {r['ms']:.1f} | "
                     f"{r['ratio_to_mlla']:.2f} | {mem} | {r['params_m']:.1f} | {r['gmacs']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["height"], r["width"], r["dtype"]) for r in rows})
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(backbones)
    for i, b in enumerate(backbones):
        sel = [next((r for r in rows if r["backbone"] == b and (r["height"], r["width"], r["dtype"]) == g), None) for g in groups]
        xs = [k + i * width for k in range(len(groups))]
        axes[0].bar(xs, [r["ms"] if r else 0 for r in sel], width, label=b)
        axes[1].bar(xs, [(r["peak_mem_mib"] or 0) if r else 0 for r in sel], width, label=b)
    for ax, ylabel in zip(axes, ("forward time (ms, median)", "peak memory of one call (MiB)")):
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))], [f"{h}x{w} {d}" for h, w, d in groups])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"UperNet, batch 1, eval: {rows[0]['gpu'] or rows[0]['cpu']} ({rows[0]['device']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        probe = json.loads(args.memory_probe)
        torch.set_num_threads(probe.pop("threads"))
        print(peak_memory_mib(probe["backbone"], tuple(probe["size"]), probe["dtype"], probe["device"]))
        return 0
    rows = run(args)
    out = Path(args.output_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), out / "results.csv")
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)), out / "results.json")
    text = table(rows)
    atomic_save(lambda tmp: Path(tmp).write_text(text + "\n"), out / "table.md")
    plot(rows, out / "dense_seg.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
