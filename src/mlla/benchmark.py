"""Interleaved speed benchmark: throughput, batch-1 latency, peak memory and achieved GFLOP/s.

Every model variant of a group (same image size, batch, task and mode) is warmed up, then timed
in rounds ``A B C A B C ...`` in one process, so that load changes on a shared machine hit all
of them alike; medians over the rounds are reported. A square matmul is timed in the same rounds
(one per dtype) as the machine's peak, beside each model's achieved GFLOP/s. GPU timings
synchronise before reading the clock.

Peak memory is the growth of one call over what the model and input already hold: on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call; on CPU the
growth of the resident set's high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) during one call after a warm-up call, measured in a fresh process per
model so that no other model's freed memory hides it (and with the default allocator, whatever the
timing runs use).

Precision: ``fp32`` is strict float32 on CUDA (TF32 off for matmuls and cuDNN), ``tf32`` the same
with TF32 on (CUDA only), ``bf16``/``fp16`` autocast. ``attention_backends`` adds a variant of
each MLLA model per :func:`mlla.ops.set_attention_backend` setting (``"triton"``: the fused
attention kernel); other models run once.

``allocator="retain"`` times CPU runs with :func:`mlla.runtime.retain_freed_memory` applied to the
whole process (all models alike), as a server tuned for inference would run; it is recorded in
every row.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from .checkpoint import unwrap_features_only
from .runtime import retain_freed_memory, trim_freed_memory

K = TypeVar("K")

__all__ = [
    "BACKENDS",
    "BenchmarkSpec",
    "Variant",
    "apply_allocator",
    "build_model",
    "environment",
    "format_table",
    "parse_size",
    "plot_results",
    "run_benchmark",
    "synchronize",
    "time_call",
    "time_interleaved",
    "write_results",
]

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = ("cls", "features")
MODES = ("infer", "train")
#: "default": the C library's allocator as configured; "retain": :func:`mlla.runtime.retain_freed_memory`.
ALLOCATORS = ("default", "retain")


def apply_allocator(setting: str, device: torch.device) -> str:
    """Apply an :data:`ALLOCATORS` setting for timing on ``device`` (process-wide); return the one in effect."""
    return "retain" if setting == "retain" and device.type == "cpu" and retain_freed_memory() else "default"


def parse_size(text: str) -> tuple[int, int]:
    """``'224'`` -> ``(224, 224)``; ``'320x256'`` -> ``(320, 256)`` (height x width)."""
    parts = str(text).lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size {text!r} is not N or HxW with positive integers, e.g. 224 or 320x256")
    return size  # type: ignore[return-value]


#: How a model runs: PyTorch's eager mode, ``torch.compile`` (inductor), or eager mode replayed
#: from one captured CUDA graph per call (no CPU launch cost; CUDA only).
BACKENDS = ("eager", "compile", "cudagraph")


@dataclass(frozen=True)
class Variant:
    """One timed entry of a group: a model in a dtype and a :data:`BACKENDS` mode."""

    model: str
    dtype: str = "fp32"
    backend: str = "eager"
    attention: str = "torch"  # mlla.ops attention backend (MLLA models)

    @property
    def label(self) -> str:
        attention = f" {self.attention}-attention" if self.attention != "torch" else ""
        mode = {"eager": "", "compile": " compiled", "cudagraph": " cuda-graph"}[self.backend]
        return f"{self.model} {self.dtype}{mode}{attention}"


@dataclass
class BenchmarkSpec:
    """What to measure; every combination of the list fields is run."""

    models: Sequence[str]
    sizes: Sequence[tuple[int, int]] = ((224, 224),)
    batch_sizes: Sequence[int] = (32,)
    dtypes: Sequence[str] = ("fp32",)
    backends: Sequence[str] = ("eager",)
    task: str = "cls"
    mode: str = "infer"
    warmup: int = 2
    rounds: int = 5
    min_round_s: float = 0.0
    threads: int | None = None
    device: str = "cpu"
    memory: str = "eager"
    fuse: bool = True
    matmul_size: int = 2048
    allocator: str = "default"
    attention_backends: Sequence[str] = ("torch",)

    def validate(self) -> None:
        if not self.models:
            raise ValueError("no models to benchmark; pass --models NAME [NAME ...]")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
        for b in self.backends:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; choose from {BACKENDS}")
        if "cudagraph" in self.backends and not self.device.startswith("cuda"):
            raise ValueError("backend 'cudagraph' replays CUDA graphs: use it with --device cuda")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {TASKS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {MODES}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator setting {self.allocator!r}; choose from {ALLOCATORS}")
        if self.memory not in ("none", "eager", "all"):
            raise ValueError(f"memory must be 'none', 'eager' or 'all', got {self.memory!r}")
        if self.rounds < 1 or self.warmup < 1 or min(self.batch_sizes) < 1:
            raise ValueError("rounds, warmup and batch sizes must be at least 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if "tf32" in self.dtypes and not self.device.startswith("cuda"):
            raise ValueError("dtype tf32 (TF32 matmuls and convolutions) is a CUDA setting; use fp32 on the CPU")
        _check_attention_backends(self.attention_backends, self.device)
        import timm

        for name in self.models:
            if not timm.is_model(name):
                raise ValueError(f"unknown model {name!r}; see `mlla models` or timm.list_models()")

    def variants(self) -> list[Variant]:
        return [
            Variant(m, d, b, a) for m in self.models for d in self.dtypes for b in self.backends
            for a in (self.attention_backends if _uses_mlla_attention(m) else ("torch",))
        ]


def _uses_mlla_attention(name: str) -> bool:
    """Whether the timm model ``name`` is one of MLLA's (its attention follows the backend switch)."""
    import timm

    return name in timm.list_models(module="mlla")


def _check_attention_backends(names: Sequence[str], device: str) -> None:
    """Refuse attention backends that cannot run on ``device`` (:func:`mlla.ops.mlla_attn.backend.check_backend`)."""
    from .ops.mlla_attn.backend import check_backend

    for name in names:
        check_backend(name, torch.device(device).type)


@contextlib.contextmanager
def precision(dtype: str, device: torch.device):
    """On CUDA, TF32 on for ``tf32`` and off for every other dtype (matmuls and cuDNN), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def environment(device: str = "cpu") -> dict[str, Any]:
    """Machine, thread count and versions, recorded with every result."""
    import timm

    from . import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = dict(
        machine=platform.node(),
        platform=platform.platform(),
        cpu=cpu,
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        mlla=__version__,
        device=device,
    )
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def build_model(name: str, img_size: tuple[int, int], task: str = "cls", *, fuse: bool = True) -> nn.Module:
    """Create ``name`` (no pretrained weights) for inputs of ``img_size``.

    Models with a fixed input size (Swin, ViT) are built for ``img_size``; ``task='features'``
    builds timm's ``features_only`` backbone. ``fuse`` calls ``model.fuse()`` where the model has
    one (BatchNorm folded into convolutions; only used for inference).
    """
    import timm
    from timm.models import get_pretrained_cfg

    kwargs: dict[str, Any] = {}
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    if task == "features":
        kwargs["features_only"] = True
    model = timm.create_model(name, pretrained=False, **kwargs)
    target = unwrap_features_only(model)
    if fuse and hasattr(target, "fuse"):
        target.fuse()
    return model


@functools.lru_cache(maxsize=None)
def _gmacs(name: str, img_size: tuple[int, int], task: str) -> float | None:
    """Forward GMACs per image, counted on the meta device (no memory, no time)."""
    from .profiling import count_gmacs

    try:
        with torch.device("meta"):
            model = build_model(name, img_size, task, fuse=False)
        return count_gmacs(model, (3, *img_size))
    except Exception:  # a model that cannot run on the meta device: leave the column empty
        return None


def _reduce(out: Any) -> torch.Tensor:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().mean() for o in outs)


def make_step(model: nn.Module, x: torch.Tensor, dtype: str, mode: str, attention: str = "torch",
              backend: str = "eager") -> Callable[[], None]:
    """One inference call, or one training step (forward, backward) for ``mode='train'``, in
    ``dtype``'s :func:`precision` and with MLLA's attention backend ``attention``; for backend
    ``"cudagraph"``, the replay of that call captured once in a CUDA graph."""
    from .ops import attention_backend

    device_type = x.device.type
    graphed = backend == "cudagraph"

    def autocast():  # autocast's weight-cast cache must not outlive a graph capture
        if DTYPES[dtype] == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=DTYPES[dtype], cache_enabled=not graphed)

    if mode == "train":
        def step() -> None:
            with precision(dtype, x.device), attention_backend(attention):
                with autocast():
                    loss = _reduce(model(x))
                loss.backward()
            if not graphed:  # a graph keeps its gradients in its own memory, rewritten by each replay
                for p in model.parameters():
                    p.grad = None
    else:
        def step() -> None:
            with torch.no_grad(), autocast(), precision(dtype, x.device), attention_backend(attention):
                model(x)
    return _capture(step, model, x.device) if graphed else step


def _capture(step: Callable[[], None], model: nn.Module, device: torch.device) -> Callable[[], None]:
    """``step`` captured in one CUDA graph (after warm-up calls on a side stream, as PyTorch's
    whole-network capture recipe does); returns the graph's replay. Gradients live in the graph's
    memory: each replay overwrites them, as a step that frees them first would recompute them."""
    if device.type != "cuda":
        raise ValueError("backend 'cudagraph' replays CUDA graphs: use it with --device cuda")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # lazy initialisation, kernel compilation and autotuning happen here
            step()
            for p in model.parameters():
                p.grad = None
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` (the device synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    steps: Mapping[K, Callable[[], Any]],
    device: torch.device,
    *,
    rounds: int,
    warmup: int = 1,
    min_round_s: float = 0.0,
    progress: bool = False,
    desc: str = "rounds",
) -> tuple[dict[K, list[float]], dict[K, int]]:
    """``(seconds per call of each step in each round, calls per round of each step)``: ``rounds``
    rounds that call every step in turn (so a load spike of a shared machine hits all of them
    alike). Each step is first called ``warmup`` times (at least once); the fastest of those sets
    how many calls make a round of about ``min_round_s`` (0: one call)."""
    from tqdm import tqdm

    calls = {}
    for key, step in steps.items():
        fastest = min(time_call(step, device) for _ in range(max(warmup, 1)))
        calls[key] = max(1, math.ceil(min_round_s / max(fastest, 1e-9))) if min_round_s else 1
    times: dict[K, list[float]] = {key: [] for key in steps}
    for _ in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        for key, step in steps.items():
            times[key].append(time_call(step, device, calls[key]))
    return times, calls


def _matmul_step(n: int, dtype: str, device: torch.device) -> Callable[[], None]:
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])

    def step() -> None:
        with precision(dtype, device):
            torch.mm(a, b)
    return step


def _prepare(variant: Variant, spec: BenchmarkSpec, size: tuple[int, int], batch: int, device: torch.device):
    model = build_model(variant.model, size, spec.task, fuse=spec.fuse and spec.mode == "infer")
    target = unwrap_features_only(model)
    if (DTYPES[variant.dtype] != torch.float32 or device.type != "cpu") and hasattr(target, "set_fused_inference"):
        # The fused eager path refuses autocast, and it is the CPU's (in place, in token chunks): the plain path.
        target.set_fused_inference(False)
    model = model.to(device).train(spec.mode == "train")
    x = torch.randn(batch, 3, *size, device=device)
    if variant.backend == "compile":
        model = torch.compile(model)
    return model, x


def run_benchmark(spec: BenchmarkSpec, progress: bool = True) -> list[dict[str, Any]]:
    """Time every variant of ``spec`` interleaved per (size, batch) group; one row per variant."""
    from tqdm import tqdm

    spec.validate()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    env = environment(spec.device)
    env["allocator"] = apply_allocator(spec.allocator, device)
    rows: list[dict[str, Any]] = []
    variants = spec.variants()
    groups = [(s, b) for s in spec.sizes for b in spec.batch_sizes]
    for size, batch in groups:
        steps: dict[str, Callable[[], None]] = {}
        for dt in spec.dtypes:
            steps[f"matmul {dt}"] = _matmul_step(spec.matmul_size, dt, device)
        desc = f"{spec.task} {spec.mode} {size[0]}x{size[1]} batch {batch}"
        for variant in tqdm(variants, desc=f"warm-up {desc}", disable=not progress, leave=False):
            model, x = _prepare(variant, spec, size, batch, device)
            steps[variant.label] = make_step(model, x, variant.dtype, spec.mode, variant.attention, variant.backend)
        times, calls = time_interleaved(steps, device, rounds=spec.rounds, warmup=spec.warmup, min_round_s=spec.min_round_s,
                                        progress=progress, desc=f"rounds {desc}")
        peaks = {dt: 2 * spec.matmul_size**3 / statistics.median(times[f"matmul {dt}"]) / 1e9 for dt in spec.dtypes}
        for variant in variants:
            ts = times[variant.label]
            median = statistics.median(ts)
            gmacs = _gmacs(variant.model, size, spec.task)
            flops_per_img = None if gmacs is None else 2 * gmacs * (3 if spec.mode == "train" else 1)
            gflops = None if flops_per_img is None else flops_per_img * batch / median
            rows.append(dict(
                model=variant.model,
                task=spec.task,
                mode=spec.mode,
                dtype=variant.dtype,
                backend=variant.backend,
                attention=variant.attention,
                height=size[0],
                width=size[1],
                batch=batch,
                ms_per_batch=1e3 * median,
                ms_min=1e3 * min(ts),
                ms_max=1e3 * max(ts),
                img_per_s=batch / median,
                gmacs_per_img=gmacs,
                achieved_gflops=gflops,
                matmul_peak_gflops=peaks[variant.dtype],
                pct_of_peak=None if gflops is None else 100 * gflops / peaks[variant.dtype],
                peak_mem_mib=None,
                rounds=spec.rounds,
                calls_per_round=calls[variant.label],
                **env,
            ))
        del steps
        gc.collect()
    if spec.memory != "none":
        for row in tqdm(rows, desc="peak memory", disable=not progress, leave=False):
            if spec.memory == "all" or row["backend"] == "eager":
                row["peak_mem_mib"] = measure_peak_memory(row, spec)
    return rows


def _peak_memory_here(model_name: str, size: tuple[int, int], batch: int, dtype: str, backend: str,
                      task: str, mode: str, device: str, fuse: bool, attention: str = "torch") -> float:
    """Extra memory (MiB) of one call, measured in this process (see the module docstring)."""
    spec = BenchmarkSpec([model_name], task=task, mode=mode, device=device, fuse=fuse)
    dev = torch.device(device)
    model, x = _prepare(Variant(model_name, dtype, backend, attention), spec, size, batch, dev)
    return call_peak_memory_mib(make_step(model, x, dtype, mode, attention, backend), dev)


def call_peak_memory_mib(call: Callable[[], Any], device: torch.device) -> float:
    """Extra memory (MiB) one ``call()`` adds at its peak, after a warm-up call (lazy
    initialisation, compilation, weight repacking): allocator peak on CUDA, the process's
    high-water mark over its resident set on CPU (Linux; run it in a fresh process)."""
    call()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    trim_freed_memory()  # hand freed heap pages back, so RSS is tight
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    call()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def measure_peak_memory(row: dict[str, Any], spec: BenchmarkSpec) -> float | None:
    """Peak memory (MiB) of one call of ``row``'s variant, in a fresh process (None if unsupported)."""
    if spec.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        return None
    args = dict(
        model_name=row["model"], size=[row["height"], row["width"]], batch=row["batch"], dtype=row["dtype"],
        backend=row["backend"], task=row["task"], mode=row["mode"], device=spec.device,
        fuse=spec.fuse and spec.mode == "infer", attention=row.get("attention", "torch"),
    )
    if spec.device.startswith("cuda"):  # the allocator's own peak: exact in this process, and no CUDA start-up per row
        args["size"] = tuple(args["size"])
        return _peak_memory_here(**args)
    args["threads"] = torch.get_num_threads()
    proc = subprocess.run(
        [sys.executable, "-m", "mlla.benchmark", "--memory-probe", json.dumps(args)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {row['model']} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _memory_probe_main(payload: str) -> None:
    import mlla  # noqa: F401  (registers the models)

    args = json.loads(payload)
    torch.set_num_threads(args.pop("threads"))
    args["size"] = tuple(args["size"])
    print(_peak_memory_here(**args))


COLUMNS = [
    "model", "task", "mode", "dtype", "backend", "attention", "height", "width", "batch", "img_per_s", "ms_per_batch",
    "ms_min", "ms_max", "gmacs_per_img", "achieved_gflops", "matmul_peak_gflops", "pct_of_peak", "peak_mem_mib",
    "rounds", "calls_per_round", "threads", "allocator", "device", "cpu", "machine", "torch", "timm", "mlla",
]


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of the main columns."""
    head = ["model", "task", "mode", "dtype", "backend", "size", "batch", "img/s", "ms/batch", "GFLOP/s",
            "% matmul peak", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append("| " + " | ".join([
            _model_label(r), r["task"], r["mode"], r["dtype"], r["backend"], f"{r['height']}x{r['width']}",
            str(r["batch"]), f(r["img_per_s"], ".2f"), f(r["ms_per_batch"], ".1f"), f(r["achieved_gflops"], ".0f"),
            f(r["pct_of_peak"], ".0f"), f(r["peak_mem_mib"], ".0f"),
        ]) + " |")
    return "\n".join(lines)


def _model_label(row: dict[str, Any]) -> str:
    """The model's name, with its attention backend where it is not the default."""
    attention = row.get("attention", "torch")
    return row["model"] if attention in ("torch", "", None) else f"{row['model']} ({attention} attention)"


def plot_results(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Throughput (img/s, log scale) against image size, one line per model variant and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_save

    fig, ax = plt.subplots(figsize=(9, 4.8))
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((_model_label(r), r["dtype"], r["backend"], r["task"], r["mode"], r["batch"]), []).append(r)
    # One colour per model, line style per backend, marker per task: variants of a model read together.
    colours = {m: f"C{i % 10}" for i, m in enumerate(sorted({k[0] for k in lines}))}
    for key, rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r["height"] * r["width"])
        mpix = [r["height"] * r["width"] / 1e6 for r in rs]
        ax.plot(mpix, [r["img_per_s"] for r in rs], color=colours[key[0]], marker="o" if key[3] == "cls" else "s",
                linestyle="--" if key[2] == "compile" else "-",
                label=f"{key[0]} {key[1]} {key[2]} ({key[3]}, {key[4]}, batch {key[5]})")
    env = rows[0] if rows else {}
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image size (megapixels)")
    ax.set_ylabel("throughput (img/s)")
    ax.set_title(f"{env.get('cpu', '')} - {env.get('threads', '')} threads, {env.get('device', '')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``table.md`` (and ``throughput.png``) atomically."""
    from .checkpoint import atomic_save

    out_dir = Path(out_dir)
    csv_buf = io.StringIO()
    writer = csv.DictWriter(csv_buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "csv": atomic_save(lambda tmp: Path(tmp).write_text(csv_buf.getvalue()), out_dir / "results.csv"),
        "json": atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(list(rows), indent=1)), out_dir / "results.json"),
        "table": atomic_save(lambda tmp: Path(tmp).write_text(format_table(rows) + "\n"), out_dir / "table.md"),
    }
    if plot and rows:
        paths["plot"] = plot_results(rows, out_dir / "throughput.png")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: peak-memory probe of mlla.benchmark")
    parser.add_argument("--memory-probe", required=True)
    _memory_probe_main(parser.parse_args().memory_probe)
