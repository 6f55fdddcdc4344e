"""Eager MLLA inference: the fused path of ``model.fuse()`` against the plain path, same process.

    .venv/bin/python benchmarks/fused_inference.py [--model mlla_tiny] [--size 224] [--batch 8] [--rounds 3]

Both paths run on the same BatchNorm-folded model (``set_fused_inference`` switches between them),
in interleaved rounds (the order alternates); prints each round and the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mlla
from mlla.benchmark import ALLOCATORS, apply_allocator


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlla_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", default="default", choices=ALLOCATORS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    apply_allocator(args.allocator, torch.device("cpu"))
    model = mlla.create_model(args.model).fuse()
    x = torch.randn(args.batch, 3, args.size, args.size)

    def run(fused: bool) -> float:
        model.set_fused_inference(fused)
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}
    run(True), run(False)  # warm-up
    for r in range(args.rounds):
        for fused in (True, False) if r % 2 == 0 else (False, True):
            times[fused].append(run(fused))
    for fused in (True, False):
        print(f"{'fused' if fused else 'plain'}: " + " ".join(f"{t:.3f}" for t in times[fused])
              + f" s, median {statistics.median(times[fused]):.3f} s")
    print(f"fused speed-up over plain: {statistics.median(times[False]) / statistics.median(times[True]):.2f}x "
          f"({args.model}, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, allocator {args.allocator})")


if __name__ == "__main__":
    main()
