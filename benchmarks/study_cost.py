"""What the default design study (`mlla ablate`) costs, from measured CPU time per training step.

    .venv/bin/python benchmarks/study_cost.py [--steps 5] [--calibrate STUDY/runs.csv] [--out DIR]

On one thread (``torch.set_num_threads(1)``, as each of ``mlla ablate --jobs 2``'s processes on a
2-core machine), for every default variant at the study's size, recipe and batch: the CPU time
(``time.process_time``, so that other programs on a shared machine do not inflate it) of a
training step (forward, backward, AdamW) and of an evaluation batch, and once the CPU time to
read and transform one of the built-in task's images. An epoch is then ``steps x step +
val batches x eval + images x image``; the study is ``seeds x epochs x sum over variants`` of
that, divided by ``jobs`` (the processes run side by side, one core each).

What a real run spends besides (the engine's loader, checkpoints every epoch, set-up, the
per-group evaluation) comes from ``--calibrate``: the ``runs.csv`` of a study run with ``--threads
1`` (its ``cpu_s_per_epoch`` is CPU time too). The largest per-epoch excess of a measured variant
over its step-based figure is added to every variant's epoch. Nothing is trained to completion
here: this measures the cost, not the result.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlla  # noqa: E402
from mlla.data import build_transform  # noqa: E402
from mlla.tasks.study.ablate import STUDY_MODEL_KWARGS, STUDY_RECIPE, STUDY_SEEDS, StudySpec, model_kwargs_for  # noqa: E402
from mlla.tasks.study.data import STUDY_CLASSES, draw_study_image  # noqa: E402


def _cpu(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(variants: list[str], steps: int, calibrate: str | None = None) -> dict:
    torch.set_num_threads(1)
    recipe, batch, size = STUDY_RECIPE, STUDY_RECIPE["batch_size"], STUDY_RECIPE["img_size"]
    spec = StudySpec(output=Path("unused"))
    train_images = spec.study_data.get("train_per_class", 500) * len(STUDY_CLASSES)
    val_images = spec.study_data.get("val_per_class", 100) * len(STUDY_CLASSES)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, len(STUDY_CLASSES), (batch,))
    rows = []
    for name in variants:
        torch.manual_seed(0)
        model = mlla.create_model(name, num_classes=len(STUDY_CLASSES), drop_path_rate=0.0,
                                  **model_kwargs_for(name, dict(STUDY_MODEL_KWARGS), size))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=recipe["smoothing"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def evaluate() -> None:
            with torch.no_grad():
                model.eval()(x)
            model.train()

        rows.append(dict(variant=name, step_cpu_s=_cpu(step, steps), eval_cpu_s=_cpu(evaluate, steps)))
    model = mlla.create_model("ablation_baseline", num_classes=len(STUDY_CLASSES), **STUDY_MODEL_KWARGS)
    transform = build_transform(model, is_training=False, img_size=size, crop_pct=1.0, interpolation="bicubic")
    images = [draw_study_image(STUDY_CLASSES[i % 8], random.Random(i), size) for i in range(64)]
    import io

    pngs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())

    def load() -> None:
        from PIL import Image

        for data in pngs:
            transform(Image.open(io.BytesIO(data)).convert("RGB"))

    image_cpu_s = _cpu(load, 3) / len(pngs)
    epochs, seeds, jobs = recipe["epochs"], len(STUDY_SEEDS), 2
    steps_per_epoch, val_batches = train_images // batch, -(-val_images // batch)
    for r in rows:
        r["epoch_cpu_s"] = (steps_per_epoch * r["step_cpu_s"] + val_batches * r["eval_cpu_s"]
                            + (train_images + val_images) * image_cpu_s)
    overhead, measured = 0.0, {}
    if calibrate:
        import csv

        with open(calibrate, newline="") as f:
            for run in csv.DictReader(f):
                measured.setdefault(run["variant"], []).append(float(run["cpu_s_per_epoch"]))
        excess = [statistics.mean(measured[r["variant"]]) - r["epoch_cpu_s"] for r in rows if r["variant"] in measured]
        overhead = max(0.0, *excess) if excess else 0.0
    for r in rows:
        r["measured_epoch_cpu_s"] = statistics.mean(measured[r["variant"]]) if r["variant"] in measured else None
        r["runs_cpu_min"] = seeds * epochs * (r["epoch_cpu_s"] + overhead) / 60
    total_min = sum(r["runs_cpu_min"] for r in rows)
    return dict(
        variants=rows, image_cpu_s=image_cpu_s, epochs=epochs, seeds=seeds, jobs=jobs, batch=batch, img_size=size,
        train_images=train_images, val_images=val_images, calibrated_from=calibrate, epoch_overhead_cpu_s=overhead,
        total_cpu_min=total_min, estimate_wall_min=total_min / jobs,
        torch=torch.__version__, threads=1,
    )


def render(result: dict) -> str:
    lines = [
        f"Default study: {len(result['variants'])} variants x {result['seeds']} seeds x {result['epochs']} epochs of "
        f"{result['train_images']} images (batch {result['batch']}, {result['img_size']} px), one thread per process.",
        "",
        "| variant | CPU s / train step | CPU s / eval batch | CPU s / epoch from steps | CPU s / epoch measured "
        "| CPU min, all seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        real = "-" if r["measured_epoch_cpu_s"] is None else f"{r['measured_epoch_cpu_s']:.1f}"
        lines.append(f"| {r['variant']} | {r['step_cpu_s']:.3f} | {r['eval_cpu_s']:.3f} | {r['epoch_cpu_s']:.1f} | "
                     f"{real} | {r['runs_cpu_min']:.1f} |")
    lines += ["", f"Reading and transforming one image: {1000 * result['image_cpu_s']:.2f} ms CPU. Per-epoch overhead "
              f"of a real run added to every variant: {result['epoch_overhead_cpu_s']:.1f} s CPU "
              f"({'from ' + result['calibrated_from'] if result['calibrated_from'] else 'none: no --calibrate'}).",
              f"Total: {result['total_cpu_min']:.0f} CPU minutes; with `--jobs {result['jobs']}` on "
              f"{result['jobs']} cores about {result['estimate_wall_min']:.0f} minutes of wall time ("
              + ("set-up, loader and checkpoints included through the measured overhead; "
                 if result["calibrated_from"] else "set-up, loader and checkpoints not included; ")
              + "the final throughput measurement not included)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--variants", nargs="+", default=list(mlla.models.ablation.ABLATION_VARIANTS))
    parser.add_argument("--calibrate", help="runs.csv of a study run with --threads 1: per-epoch overhead of real runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/study_cost"))
    args = parser.parse_args()
    result = measure(args.variants, args.steps, args.calibrate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    (out / "cost.md").write_text(render(result) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
