"""``mlla benchmark``: interleaved throughput, latency, peak memory and GFLOP/s of any models."""
from __future__ import annotations

import argparse

DEFAULT_MODELS = ["mlla_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny", "vit_small_patch16_224"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..benchmark import ALLOCATORS

    p = subparsers.add_parser(
        "benchmark",
        help="time models interleaved (img/s, batch-1 latency, peak memory, GFLOP/s vs a matmul peak)",
        description="Warm up every model variant, then time them in rounds A B C A B C ... in one process "
        "and report medians. Writes results.csv, results.json, table.md and throughput.png.",
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", default=["224"], help="image sizes, N or HxW (default: 224)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32], help="batch sizes; 1 gives latency (default: 32)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"],
                   help="fp32 (on CUDA: TF32 off), tf32 (CUDA: fp32 with TF32 on), bf16, fp16 (autocast) (default: fp32)")
    p.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "compile", "cudagraph"],
                   help="eager, compile (torch.compile) and/or cudagraph (eager, replayed from a captured CUDA graph: "
                        "no CPU launch cost; CUDA only)")
    p.add_argument("--attention-backends", nargs="+", default=["torch"], choices=["torch", "triton", "auto"],
                   help="MLLA models: one variant per attention backend (mlla.ops.set_attention_backend; "
                        "'triton' is the fused kernel, CUDA only) (default: torch, the PyTorch form as the baseline; "
                        "the library's own default is auto)")
    p.add_argument("--task", default="cls", choices=["cls", "features"], help="classifier or features_only backbone")
    p.add_argument("--mode", default="infer", choices=["infer", "train"], help="inference, or training step (forward + backward)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant (default: 2)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are reported (default: 5)")
    p.add_argument("--min-round-s", type=float, default=0.0, help="repeat calls within a round up to this time (for fast GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--memory", default="eager", choices=["none", "eager", "all"],
                   help="measure peak memory for eager variants, all variants, or none (default: eager)")
    p.add_argument("--allocator", default="default", choices=ALLOCATORS,
                   help="CPU: 'retain' keeps freed memory in the process for reuse (mlla.runtime.retain_freed_memory), "
                        "for all models alike (default: %(default)s)")
    p.add_argument("--no-fuse", action="store_true", help="do not call model.fuse() (BatchNorm folding) for inference")
    p.add_argument("--output-dir", default="benchmark-results", help="where to write the results (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip throughput.png")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace):
    from ..benchmark import BenchmarkSpec, parse_size

    return BenchmarkSpec(
        models=args.models,
        sizes=[parse_size(s) for s in args.sizes],
        batch_sizes=args.batch_sizes,
        dtypes=args.dtypes,
        backends=args.backends,
        task=args.task,
        mode=args.mode,
        warmup=args.warmup,
        rounds=args.rounds,
        min_round_s=args.min_round_s,
        threads=args.threads,
        device=args.device,
        memory=args.memory,
        fuse=not args.no_fuse,
        allocator=args.allocator,
        attention_backends=args.attention_backends,
    )


def run(args: argparse.Namespace) -> int:
    import mlla  # noqa: F401  (registers the models)

    from ..benchmark import format_table, run_benchmark, write_results

    rows = run_benchmark(spec_from_args(args))
    print(format_table(rows))
    env = rows[0]
    print(f"\n{env['cpu']}, {env['threads']} threads, device {env['device']}; torch {env['torch']}, timm {env['timm']}, "
          f"mlla {env['mlla']}; medians of {args.rounds} interleaved rounds")
    for kind, path in write_results(rows, args.output_dir, plot=not args.no_plot).items():
        print(f"{kind}: {path}")
    return 0
