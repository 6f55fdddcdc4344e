"""Soak test of ``mlla train``: the default recipe over generated images, killed and resumed.

Generates an ImageFolder of the demo shapes (``--images`` training images, a tenth of that for
validation) in which every tenth training image is stored in another mode Pillow opens
(16-bit ``I;16``, palette ``P``, ``RGBA`` with transparent pixels, ``LA``, ``L``). Trains
``--model`` with the default recipe (RandAugment ``rand-m9-mstd0.5-inc1``, random erasing,
Mixup/CutMix, label smoothing, EMA) and ``--workers`` loader processes, and kills the whole
process group with SIGKILL ``--kills`` times at random moments (a random step, then a random
delay: possibly mid-save), each time resuming with ``--resume auto``. Passes when the run
finishes with every epoch in the metrics, no failed sample and no leftover file.

    .venv/bin/python benchmarks/soak_train.py                      # 2000 images, 32 px, 4 epochs, 2 workers

Writes ``OUT.json`` and ``OUT.md`` (default benchmarks/results/soak_train). Exit status 1 if a
check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
from PIL import Image

from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset

_MODES = ("I;16", "P", "RGBA", "LA", "L")


def _restore_mode(path: Path, mode: str) -> None:
    """Rewrite ``path`` (an RGB PNG) in ``mode``, keeping what it shows."""
    rgb = Image.open(path).convert("RGB")
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(grey)
    elif mode == "P":
        img = rgb.quantize(64)
    elif mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putpixel((0, 0), (0, 0, 0, 0))
    elif mode == "LA":
        img = rgb.convert("LA")
    else:
        img = rgb.convert(mode)
    img.save(path)


def make_data(root: Path, images: int, img_size: int, seed: int) -> dict[str, int]:
    per_class = max(1, images // len(DEMO_CLASSES))
    make_demo_dataset(root, per_class, max(1, per_class // 10), img_size=img_size, seed=seed, progress=False)
    counts = dict.fromkeys(_MODES, 0)
    for i, path in enumerate(sorted((root / "train").rglob("*.png"))):
        if i % 10 == 0:
            mode = _MODES[(i // 10) % len(_MODES)]
            _restore_mode(path, mode)
            counts[mode] += 1
    return counts


def _global_step(output: Path) -> int:
    try:
        return int(torch.load(output / "last.pth", weights_only=True, map_location="cpu")["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def run_segment(cmd: list[str], env: dict[str, str], output: Path, kill_at_step: int | None, rng: random.Random,
                log: Path) -> dict:
    """Run ``cmd`` to the end, or SIGKILL its process group once ``last.pth`` reaches
    ``kill_at_step`` (plus a random 0-2 s)."""
    start = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        killed_at = None
        if kill_at_step is not None:
            while proc.poll() is None and _global_step(output) < kill_at_step:
                time.sleep(0.2)
            if proc.poll() is None:
                time.sleep(rng.uniform(0, 2))
                killed_at = _global_step(output)
                os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers
        proc.wait()
    return dict(returncode=proc.returncode, seconds=round(time.perf_counter() - start, 1),
                kill_target_step=kill_at_step, checkpoint_step_at_kill=killed_at)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="test_mlla")
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--save-every-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="data and kill moments")
    p.add_argument("--work-dir", default=None, help="where data and run go (default: a temporary folder)")
    p.add_argument("--out", default="benchmarks/results/soak_train")
    args = p.parse_args()

    rng = random.Random(args.seed)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mlla_soak_"))
    data, output, log = work / "data", work / "run", work / "train.log"
    if output.exists():
        raise SystemExit(f"{output} exists: give an empty --work-dir")
    t0 = time.perf_counter()
    modes = make_data(data, args.images, args.img_size, args.seed)
    gen_seconds = time.perf_counter() - t0
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    steps_per_epoch = n_train // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    # random kill moments, spread over the run (the first in the first half, the others after it)
    bounds = np.linspace(0.1, 0.9, args.kills + 1)
    targets = [int(total_steps * rng.uniform(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "mlla", "train", "--model", args.model, "--data-dir", str(data),
           "--output", str(output), "--epochs", str(args.epochs), "-b", str(args.batch_size),
           "--img-size", str(args.img_size), "-j", str(args.workers), "--no-progress", "--no-amp",
           "--lr", "1e-3", "--warmup-epochs", "1", "--save-every-steps", str(args.save_every_steps),
           "--resume", "auto"]
    segments = [run_segment(cmd, env, output, t, rng, log) for t in targets]
    segments.append(run_segment(cmd, env, output, None, rng, log))

    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    leftovers = sorted(str(q.relative_to(output)) for q in output.rglob(".*.tmp"))
    text = log.read_text()
    final = torch.load(output / "last.pth", weights_only=True, map_location="cpu")
    checks = {
        "killed segments ended by SIGKILL": all(s["returncode"] == -signal.SIGKILL for s in segments[:-1]),
        "kills happened mid-run": all(s["checkpoint_step_at_kill"] is not None and s["checkpoint_step_at_kill"] < total_steps
                                      for s in segments[:-1]),
        "last segment finished (exit 0)": segments[-1]["returncode"] == 0,
        "every epoch in metrics.jsonl once": [r["epoch"] for r in rows] == list(range(1, args.epochs + 1)),
        "metrics.csv has the same rows": (output / "metrics.csv").read_text().count("\n") == len(rows) + 1,
        "all steps done": int(final["global_step"]) == total_steps,
        "no failed sample": all(r["train_skipped"] == 0 and r.get("val_skipped", 0) == 0 for r in rows)
        and "skipping" not in text,
        "no leftover temporary file": not leftovers,
        "no traceback": "Traceback" not in text,
    }
    summary = dict(
        settings=dict(vars(args), work_dir=str(work), train_images=n_train, val_images=sum(1 for _ in (data / "val").rglob("*.png")),
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps, recipe="defaults: rand-m9-mstd0.5-inc1, "
                      "reprob 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1, EMA", command=" ".join(cmd)),
        other_modes_in_train=modes,
        generation_seconds=round(gen_seconds, 1),
        segments=segments,
        epochs=[dict(epoch=r["epoch"], train_loss=round(r["train_loss"], 4), val_top1=r.get("val_top1"),
                     ema_top1=r.get("ema_top1"), train_skipped=r["train_skipped"], val_skipped=r.get("val_skipped"))
                for r in rows],
        leftover_files=leftovers,
        checks=checks,
        passed=all(checks.values()),
        versions=dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__, pillow=PIL.__version__),
        machine=dict(cpus=os.cpu_count(), platform=platform.platform()),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Training soak (benchmarks/soak_train.py)", "",
        f"`{Path(sys.argv[0]).as_posix()} {' '.join(sys.argv[1:])}`".replace("` ", "`"), "",
        f"{n_train} training images ({', '.join(f'{v} {k}' for k, v in modes.items())} among them), "
        f"{summary['settings']['val_images']} validation, {args.img_size} px, {args.model}, batch {args.batch_size}, "
        f"{args.workers} workers, {args.epochs} epochs ({total_steps} steps), default recipe; "
        f"torch {torch.__version__}, timm {timm.__version__}, Pillow {PIL.__version__}.", "",
        "| segment | ended | wall s | kill target step | checkpoint step at kill |", "|---|---|---|---|---|",
    ]
    for i, s in enumerate(segments, 1):
        ended = "SIGKILL" if s["returncode"] == -signal.SIGKILL else f"exit {s['returncode']}"
        lines.append(f"| {i} | {ended} | {s['seconds']} | {s['kill_target_step'] or '-'} | {s['checkpoint_step_at_kill'] or '-'} |")
    lines += ["", "| epoch | train loss | val top-1 | EMA top-1 | failed train | failed val |", "|---|---|---|---|---|---|"]
    for r in summary["epochs"]:
        lines.append(f"| {r['epoch']} | {r['train_loss']} | {r['val_top1']:.2f} | {r['ema_top1']:.2f} | "
                     f"{r['train_skipped']} | {r['val_skipped']} |")
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
