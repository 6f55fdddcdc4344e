"""Where one call of MLLA's attention spends its time on a GPU: the CPU that queues its kernels,
or the GPU that runs them.

    python benchmarks/attention_launch_cost.py OUT.json            # on the GPU machine
    python benchmarks/attention_launch_cost.py OUT.json cpu        # logic check: one shape (no GPU figures)

For bfloat16 inputs of five shapes (``(grid, batch, heads)``: MLLA-T's stage 1 at 1024^2 batch 4,
its stage 4 there, stages 1 and 4 at 224 batch 128, stage 4 at batch 1), each attention backend
and each pass (``fwd``; ``fwdbwd``: forward, ``sum()`` and backward), after 5 warm-up calls: the
CPU time to queue one call (50 calls without synchronising; the grid's width passed, as the model
does), the time per call once the GPU has
finished them, the GPU's busy time per call (``torch.profiler`` kernel durations, 10 calls) with
its launches, and the 8 longest kernels. Queue time near the time per call and far above busy
time: the call is bound by the CPU. Writes the JSON given.
"""
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mlla.checkpoint import atomic_save
from mlla.ops import attention_backend, rope_2d_head_tables
from mlla.ops.mlla_attn import mlla_attention

dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
res = {}
SHAPES = ((256, 4, 2), (32, 4, 16), (56, 128, 2), (7, 128, 16), (7, 1, 16))
for (grid, B, H) in (SHAPES if dev.type == "cuda" else SHAPES[-1:]):
    N, d = grid * grid, 32
    qk = torch.randn(B, N, 2, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_2d_head_tables(grid, grid, H * d, H, device=dev)
    for backend in ("triton", "torch"):
        for p in ("fwd", "fwdbwd"):
            def step():
                with attention_backend(backend):
                    if p == "fwd":
                        with torch.no_grad():
                            mlla_attention(qk, v, cos, sin, width=grid)
                    else:
                        mlla_attention(qk, v, cos, sin, width=grid).sum().backward()
            for _ in range(5):
                step()
            sync()
            t = time.perf_counter()
            n = 50
            for _ in range(n):
                step()
            enq = (time.perf_counter() - t) / n
            sync()
            tot = (time.perf_counter() - t) / n
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                sync()
            ks = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(u for _, u in ks) / 10
            by = {}
            for nme, u in ks:
                by[nme[:60]] = by.get(nme[:60], 0) + u / 10
            key = f"grid{grid} B{B} H{H} {backend} {p}"
            res[key] = dict(enqueue_us=enq * 1e6, per_call_us=tot * 1e6, gpu_busy_us=busy, launches=len(ks) / 10,
                            kernels=dict(sorted(by.items(), key=lambda kv: -kv[1])[:8]))
            print(key, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res[key].items() if k != "kernels"}, flush=True)
            print("   ", {k: round(v, 1) for k, v in res[key]["kernels"].items()}, flush=True)
atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1)), sys.argv[1])
