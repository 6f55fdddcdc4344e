"""Dense-prediction speed benchmark: backbone and whole-model forward time and peak memory of
MLLA-T against timm's Swin-T and ConvNeXt-T under the same FPN and heads (one run, interleaved,
medians), written to CSV/Markdown and plotted:

    .venv/bin/python benchmarks/dense.py                       # all sizes (long on a CPU)
    .venv/bin/python benchmarks/dense.py --sizes 512 1024 800x1333 2048 --rounds 3

Each *part* is a model built around a backbone: ``backbone`` (timm ``features_only``, strides
4-32) and ``mask_rcnn`` (the whole detector of :func:`mlla.dense.mask_rcnn`, eval mode, batch 1,
input not resized: ``min_size``/``max_size`` set to the image's sides, so the backbone sees the
image padded to a multiple of 32, as ``backbone`` is given it; 100 detections kept at a
score threshold of 0 so that every backbone does the same work after the RPN). More parts (e.g.
segmentation heads) are one entry in :data:`PARTS`. For each image size every (part, backbone)
is warmed up, then timed in rounds ``A B C ...``; medians over the rounds. Peak memory: the
growth of one call after a warm-up call (CUDA: ``max_memory_allocated``, in this process; CPU:
the resident set's high-water mark, ``VmHWM``, in a fresh process per entry).
``summary.md`` gives the ratios the issue asks about, computed from the same rows.

On a GPU (``--device cuda``) MLLA runs its plain block path (BatchNorm still folded: the fused
in-place path is the CPU's), and ``--attention-backend triton`` runs its attention as the fused
Triton kernel (:func:`mlla.ops.set_attention_backend`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import mlla  # noqa: F401  (registers the models)
from mlla.benchmark import call_peak_memory_mib, environment, parse_size, time_interleaved
from mlla.checkpoint import atomic_save
from mlla.ops import get_attention_backend, set_attention_backend

MLLA, SWIN, CONVNEXT = "mlla_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"
#: timm arguments for backbones that need them to take any input size and return NCHW maps.
BACKBONE_KWARGS: dict[str, dict[str, Any]] = {SWIN: dict(strict_img_size=False, feature_cls="getter")}


def _fused(body: nn.Module) -> nn.Module:
    """``body`` with an MLLA backbone switched to its inference form (``fuse()``: BatchNorm folded,
    in-place block path), as benchmarks/inference.py and dense_seg.py time it; others as they are."""
    from mlla.checkpoint import unwrap_features_only

    target = unwrap_features_only(body)
    if hasattr(target, "fuse"):
        target.fuse()
    return body


def _backbone(name: str, size: tuple[int, int]) -> nn.Module:
    from mlla.tasks.detection.model import mask_rcnn_backbone

    return _fused(mask_rcnn_backbone(name, backbone_kwargs=BACKBONE_KWARGS.get(name)).body)


def _mask_rcnn(name: str, size: tuple[int, int]) -> nn.Module:
    from mlla.dense import mask_rcnn

    model = mask_rcnn(name, 80, backbone_kwargs=BACKBONE_KWARGS.get(name), min_size=min(size), max_size=max(size),
                      box_score_thresh=0.0, box_detections_per_img=100)
    _fused(model.backbone.body)
    return model


def _padded_batch(x: torch.Tensor) -> torch.Tensor:
    """Zero-padded right/bottom to a multiple of 32, as the detector's transform pads its batch."""
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -w % 32, 0, -h % 32))


def _list_input(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x)


#: part name -> (builder(backbone name, (H, W)) -> model, input adapter from a (B, 3, H, W) batch).
PARTS: dict[str, tuple[Callable[[str, tuple[int, int]], nn.Module], Callable[[torch.Tensor], Any]]] = {
    "backbone": (_backbone, _padded_batch),
    "mask_rcnn": (_mask_rcnn, _list_input),
}


def _prepare(part: str, backbone: str, size: tuple[int, int], device: torch.device) -> Callable[[], Any]:
    build, adapt = PARTS[part]
    torch.manual_seed(0)
    model = build(backbone, size).to(device).eval()
    if device.type != "cpu":  # the fused in-place block path is the CPU's
        for m in model.modules():
            if hasattr(m, "set_fused_inference"):
                m.set_fused_inference(False)
    x = adapt(torch.rand(1, 3, *size, device=device))

    def call() -> Any:
        with torch.no_grad():
            return model(x)
    return call


def peak_memory_here(part: str, backbone: str, size: tuple[int, int], device: str) -> float:
    """MiB one call adds at its peak, measured in this process after a warm-up call."""
    dev = torch.device(device)
    return call_peak_memory_mib(_prepare(part, backbone, size, dev), dev)


def peak_memory(part: str, backbone: str, size: tuple[int, int], device: str, threads: int) -> float | None:
    """:func:`peak_memory_here`: on CUDA in this process (the allocator's own peak is exact, and no
    CUDA start-up per entry); elsewhere in a fresh process (no other model's freed memory hides it)."""
    if device.startswith("cuda"):
        return peak_memory_here(part, backbone, size, device)
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        return None
    payload = json.dumps(dict(part=part, backbone=backbone, size=list(size), device=device, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", payload, "--attention-backend", get_attention_backend()],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {part} {backbone} {size} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    rows: list[dict[str, Any]] = []
    for text in args.sizes:
        size = parse_size(text)
        model_sizes = [parse_size(t) for t in (args.model_sizes or args.sizes)]
        entries = [(p, b) for p in args.parts for b in args.backbones if p == "backbone" or size in model_sizes]
        calls = {e: _prepare(*e, size, device) for e in tqdm(entries, desc=f"build {size[0]}x{size[1]}", leave=False)}
        times, _ = time_interleaved(calls, device, rounds=args.rounds, warmup=args.warmup, progress=True,
                                    desc=f"rounds {size[0]}x{size[1]}")
        del calls
        for part, backbone in entries:
            ts = times[part, backbone]
            mem = None if args.no_memory else peak_memory(part, backbone, size, args.device, args.threads)
            rows.append(dict(
                part=part, backbone=backbone, height=size[0], width=size[1], batch=1,
                ms_median=1e3 * statistics.median(ts), ms_min=1e3 * min(ts), ms_max=1e3 * max(ts), rounds=len(ts),
                peak_mem_mib=mem, threads=env["threads"], device=env["device"], cpu=env["cpu"], torch=env["torch"],
                timm=env["timm"],
            ))
            print(f"{part:>10} {backbone:<30} {size[0]}x{size[1]}: {rows[-1]['ms_median']:.0f} ms"
                  + (f", {mem:.0f} MiB" if mem is not None else ""), flush=True)
            write(rows, Path(args.output_dir), quiet=True)  # each row as it is measured: an interrupted run keeps them
    return rows


COLUMNS = ["part", "backbone", "height", "width", "batch", "ms_median", "ms_min", "ms_max", "rounds", "peak_mem_mib",
           "threads", "device", "cpu", "torch", "timm"]


def summary(rows: list[dict[str, Any]]) -> str:
    """The issue's questions, answered from ``rows`` (ratios within this run)."""
    def get(part: str, backbone: str, h: int, w: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["part"], r["backbone"], r["height"], r["width"]) == (part, backbone, h, w)), None)

    lines = ["| question | value |", "|---|---|"]
    mlla_det, swin_det = get("mask_rcnn", MLLA, 800, 1333), get("mask_rcnn", SWIN, 800, 1333)
    if mlla_det and swin_det:
        ratio = swin_det["ms_median"] / mlla_det["ms_median"]
        lines.append(f"| Mask R-CNN 1333x800: MLLA-T speed over Swin-T (>= 1 is as fast or faster) | {ratio:.2f}x "
                     f"({mlla_det['ms_median']:.0f} vs {swin_det['ms_median']:.0f} ms) |")
        if mlla_det["peak_mem_mib"] is not None and swin_det["peak_mem_mib"] is not None:
            lines.append(f"| Mask R-CNN 1333x800: peak memory MLLA-T / Swin-T (< 1 is less) | "
                         f"{mlla_det['peak_mem_mib'] / swin_det['peak_mem_mib']:.3f} "
                         f"({mlla_det['peak_mem_mib']:.0f} vs {swin_det['peak_mem_mib']:.0f} MiB) |")
    for backbone in (MLLA, SWIN, CONVNEXT):
        small, large = get("backbone", backbone, 1024, 1024), get("backbone", backbone, 2048, 2048)
        if small and large:
            lines.append(f"| backbone {backbone}: time at 2048^2 over 1024^2 (pixels x4; target <= 4.2 for MLLA-T) | "
                         f"{large['ms_median'] / small['ms_median']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    backbones = sorted({r["backbone"] for r in rows})
    colours = {b: f"C{i}" for i, b in enumerate(backbones)}
    styles = {p: s for p, s in zip(PARTS, ("-", "--", ":", "-."))}
    for (part, backbone) in sorted({(r["part"], r["backbone"]) for r in rows}):
        rs = sorted((r for r in rows if (r["part"], r["backbone"]) == (part, backbone)), key=lambda r: r["height"] * r["width"])
        mpix = [r["height"] * r["width"] / 1e6 for r in rs]
        kw = dict(color=colours[backbone], linestyle=styles.get(part, "-"), marker="o", label=f"{part} {backbone}")
        axes[0].plot(mpix, [r["ms_median"] for r in rs], **kw)
        if all(r["peak_mem_mib"] is not None for r in rs):
            axes[1].plot(mpix, [r["peak_mem_mib"] for r in rs], **kw)
    env = rows[0]
    for ax, label in zip(axes, ("forward time, median (ms)", "peak memory of one call (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image size (megapixels)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"batch 1, {env['device']} ({env['cpu']}), {env['threads']} threads", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def write(rows: list[dict[str, Any]], out: Path, quiet: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), out / "results.csv")
    table = ["| part | backbone | size | ms (median) | peak MiB |", "|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        table.append(f"| {r['part']} | {r['backbone']} | {r['height']}x{r['width']} | {r['ms_median']:.0f} | {mem} |")
    text = "\n".join(table) + "\n\n" + summary(rows) + "\n"
    atomic_save(lambda tmp: Path(tmp).write_text(text), out / "summary.md")
    plot(rows, out / "dense.png")
    if not quiet:
        print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=[MLLA, SWIN, CONVNEXT])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--sizes", nargs="+", default=["512", "1024", "800x1333", "1536", "2048"], help="HxW or N")
    p.add_argument("--model-sizes", nargs="+", help="sizes at which parts other than 'backbone' run (default: --sizes)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-backend", default="torch", choices=["torch", "triton", "auto"],
                   help="MLLA's attention: PyTorch form or the fused Triton kernel (CUDA) (default: torch)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "dense"))
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_attention_backend(args.attention_backend)
    if args.memory_probe:
        spec = json.loads(args.memory_probe)
        torch.set_num_threads(spec.pop("threads"))
        spec["size"] = tuple(spec["size"])
        print(peak_memory_here(**spec))
        return 0
    out = Path(args.output_dir)
    rows = run(args)
    write(rows, out)
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1)), out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
