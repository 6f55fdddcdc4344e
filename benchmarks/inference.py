"""The README's speed benchmark, one command (CPU by default):

    .venv/bin/python benchmarks/inference.py     # full run, writes benchmarks/results/inference/

Part 1: classification at 224, batch 32: MLLA-T against timm's Swin-T, ConvNeXt-T and ViT-S,
eager and torch.compile. Part 2: backbones (features_only) at 1024^2 and 2048^2, batch 1
(latency), eager and compiled, with peak memory. Part 3: bf16 (autocast) against fp32 outputs.
Everything is timed interleaved with ``mlla.benchmark`` (medians); the target ratios of issue 5
are computed from the same rows and written to ``summary.md`` beside the CSV/JSON/plot.
Every option is configurable: see ``--help``; ``--quick`` gives a short development run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import mlla  # noqa: F401  (registers the models)
from mlla.benchmark import ALLOCATORS, BenchmarkSpec, environment, format_table, parse_size, run_benchmark, write_results
from mlla.checkpoint import atomic_save

SWIN, CONVNEXT, VIT = "swin_tiny_patch4_window7_224", "convnext_tiny", "vit_small_patch16_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlla_tiny", help="our model (default: %(default)s)")
    p.add_argument("--cls-models", nargs="+", default=[SWIN, CONVNEXT, VIT], help="yardsticks for part 1")
    p.add_argument("--dense-models", nargs="+", default=[SWIN, CONVNEXT], help="yardsticks for part 2")
    p.add_argument("--cls-size", default="224")
    p.add_argument("--batch", type=int, default=32, help="part 1 batch size (default: 32)")
    p.add_argument("--dense-sizes", nargs="+", default=["1024", "2048"], help="part 2 sizes (default: 1024 2048)")
    p.add_argument("--backends", nargs="+", default=["eager", "compile"])
    p.add_argument("--dtypes", nargs="+", default=["fp32"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allocator", default="default", choices=ALLOCATORS,
                   help="CPU allocator setting for all models alike (default: %(default)s, see mlla.runtime)")
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], help="which parts to run")
    p.add_argument("--quick", action="store_true", help="development run: batch 8, 1024^2 only, 3 rounds, eager")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "inference"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.dense_sizes, args.rounds, args.backends = 8, ["1024"], 3, ["eager"]
    return args


def bf16_agreement(model_name: str, device: str) -> dict[str, float]:
    """Relative L2 error of bf16-autocast logits against fp32, and top-1 agreement."""
    model = mlla.create_model(model_name).to(device).eval()
    model.fuse(fused_inference=False)  # the fused eager path refuses autocast
    x = torch.randn(8, 3, 224, 224, device=device)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            low = model(x).float()
    return dict(rel_l2=((low - ref).norm() / ref.norm()).item(), top1_agree=(low.argmax(1) == ref.argmax(1)).float().mean().item())


def ratio(rows: list[dict], a: tuple, b: tuple, key: str = "img_per_s") -> float | None:
    def find(model: str, backend: str, task: str, size: int) -> dict | None:
        return next((r for r in rows if (r["model"], r["backend"], r["task"], r["height"]) == (model, backend, task, size)
                     and r["dtype"] == "fp32"), None)

    ra, rb = find(*a), find(*b)
    return None if ra is None or rb is None or ra.get(key) is None or rb.get(key) is None else ra[key] / rb[key]


def summary(rows: list[dict], args: argparse.Namespace, bf16: dict | None) -> str:
    m, cls, dense = args.model, parse_size(args.cls_size)[0], [parse_size(s)[0] for s in args.dense_sizes]
    checks = [
        ("eager / Swin-T eager (224, batch %d)" % args.batch, ratio(rows, (m, "eager", "cls", cls), (SWIN, "eager", "cls", cls)), ">= 1.15"),
        ("eager / ConvNeXt-T eager", ratio(rows, (m, "eager", "cls", cls), (CONVNEXT, "eager", "cls", cls)), ">= 0.9"),
        ("compiled / own eager", ratio(rows, (m, "compile", "cls", cls), (m, "eager", "cls", cls)), ">= 1.25"),
        ("compiled / ConvNeXt-T eager", ratio(rows, (m, "compile", "cls", cls), (CONVNEXT, "eager", "cls", cls)), "> 1"),
    ]
    for s in dense:
        checks += [
            (f"backbone {s}^2 eager / Swin-T eager", ratio(rows, (m, "eager", "features", s), (SWIN, "eager", "features", s)), "> 1"),
            (f"backbone {s}^2 eager / ConvNeXt-T eager", ratio(rows, (m, "eager", "features", s), (CONVNEXT, "eager", "features", s)), ">= 0.9"),
            (f"backbone {s}^2 compiled / Swin-T eager", ratio(rows, (m, "compile", "features", s), (SWIN, "eager", "features", s)), "> 1"),
            (f"backbone {s}^2 compiled / ConvNeXt-T eager", ratio(rows, (m, "compile", "features", s), (CONVNEXT, "eager", "features", s)), "> 1"),
        ]
    if len(dense) >= 2:
        lo, hi = dense[0], dense[-1]
        px = (hi / lo) ** 2
        t = ratio(rows, (m, "eager", "features", hi), (m, "eager", "features", lo), "ms_per_batch")
        mem = ratio(rows, (m, "eager", "features", hi), (m, "eager", "features", lo), "peak_mem_mib")
        checks += [(f"time {hi}^2 / {lo}^2 (pixels x{px:.1f})", t, "< 4.6"), (f"peak memory {hi}^2 / {lo}^2", mem, "< 4.6")]
    env = environment(args.device)
    allocator = rows[0]["allocator"] if rows else args.allocator
    lines = [
        f"# {m} speed summary",
        "",
        f"{env['cpu']}, {env['threads']} threads, device {env['device']}; torch {env['torch']}, timm {env['timm']}; "
        f"medians of {args.rounds} interleaved rounds, fp32; allocator: {allocator} (all models alike).",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {'-' if v is None else f'{v:.2f}'} | {target} |" for name, v, target in checks]
    if bf16:
        lines += ["", f"bf16 autocast vs fp32 logits ({m}, 224, batch 8): relative L2 error {bf16['rel_l2']:.4f}, "
                  f"top-1 agreement {100 * bf16['top1_agree']:.0f}%."]
    lines += ["", "Command: `" + " ".join(["python", "benchmarks/inference.py", *sys.argv[1:]]) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = dict(dtypes=args.dtypes, backends=args.backends, rounds=args.rounds, warmup=args.warmup,
                  threads=args.threads, device=args.device, allocator=args.allocator)
    out = Path(args.output_dir)
    rows: list[dict] = []
    paths: dict[str, Path] = {}
    if 1 in args.parts:
        rows += run_benchmark(BenchmarkSpec([args.model, *args.cls_models], sizes=[parse_size(args.cls_size)],
                                            batch_sizes=[args.batch], task="cls", **common))
        paths = write_results(rows, out)  # written after each part: a cut-short run keeps what it measured
    if 2 in args.parts:
        for size in args.dense_sizes:
            rows += run_benchmark(BenchmarkSpec([args.model, *args.dense_models], sizes=[parse_size(size)],
                                                batch_sizes=[1], task="features", **common))
            paths = write_results(rows, out)
    bf16 = bf16_agreement(args.model, args.device) if 3 in args.parts else None
    text = summary(rows, args, bf16)
    atomic_save(lambda tmp: Path(tmp).write_text(text), out / "summary.md")
    if bf16:
        atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(bf16, indent=1)), out / "bf16.json")
    print(format_table(rows))
    print()
    print(text)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
