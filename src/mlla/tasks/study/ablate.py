"""The paper's design study (Tables 1-2) rerun on any data: train every ablation variant with one
recipe and seed, then tabulate and plot the results beside the paper's ImageNet figures.

Layout of a study folder ``OUT``::

    OUT/study_data/             the built-in task (when no --data-dir is given)
    OUT/<variant>/              one training run per variant (mlla.engine.trainer.fit): last.pth, metrics.*
    OUT/<variant>/result.json   written when the variant has finished: it is then never retrained
    OUT/results.csv, results.json, table.md, chart.png

Every variant trains through :func:`mlla.engine.trainer.fit` with ``resume='auto'``: an
interrupted variant continues from its ``last.pth``. ``jobs > 1`` trains variants side by side,
each in its own process (its own CPU threads, or its own GPU when there are several).
Throughput is measured at the end for all variants in one interleaved run (rounds ``A B C A B C``),
so that load changes on a shared machine hit all of them alike.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ...checkpoint import atomic_save
from ...engine.config import TrainConfig, save_yaml
from ...models import PAPER_RESULTS, create_model
from ...models.ablation import ABLATION_VARIANTS, variant_switches
from ..classification.task import ClassificationTask

__all__ = [
    "DESIGNS",
    "STUDY_MODEL_KWARGS",
    "STUDY_RECIPE",
    "StudySpec",
    "measure_throughput",
    "plot_study",
    "run_study",
    "variant_config",
    "write_study_results",
]

_logger = logging.getLogger(__name__)

#: What each variant changes, as the paper's tables name it.
DESIGNS: dict[str, str] = {
    "ablation_baseline": "baseline (global linear attention)",
    "ablation_input_gate": "+ input gate",
    "ablation_forget_gate": "+ forget gate",
    "ablation_shortcut": "+ shortcut",
    "ablation_no_norm": "- normalization",
    "ablation_single_head": "- multi-head",
    "ablation_block_all": "+ block design (all)",
    "ablation_block_sub": "+ block design (sub)",
    "ablation_ape": "+ APE (no forget gate)",
    "ablation_lepe": "+ LePE (no forget gate)",
    "ablation_cpe": "+ CPE (no forget gate)",
    "ablation_rope": "+ RoPE (no forget gate)",
}

#: The reduced width of the built-in study: 4 stages of 16-128 channels, 5 blocks, ~0.4M parameters.
STUDY_MODEL_KWARGS: dict[str, Any] = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))

#: The shared recipe of the built-in study: short AdamW cosine schedule, no augmentation (a
#: flip or crop would change the task's spatial classes), no EMA, float32 (CPU-friendly).
STUDY_RECIPE: dict[str, Any] = dict(
    epochs=15,
    batch_size=64,
    img_size=32,
    lr_base=2e-3,
    lr_base_size=64,
    warmup_lr_base=1e-5,
    min_lr_base=1e-5,
    warmup_epochs=1,
    weight_decay=0.05,
    clip_grad=5.0,
    amp=False,
    no_aug=True,
    mixup=0.0,
    cutmix=0.0,
    smoothing=0.1,
    crop_pct=1.0,
    drop_path=0.0,
    model_ema=False,
    mesa=0.0,
    workers=0,
)

# Settings that do not change what a variant learns: a finished variant is reused across them.
_RUN_ONLY = ("output", "resume", "progress", "workers", "device", "tensorboard", "save_every_steps", "max_failed_fraction")


@dataclass
class StudySpec:
    """What to train and how.

    Attributes:
        output: the study folder.
        variants: registered model names (default: every ablation variant).
        model_kwargs: model size shared by all variants; a variant's own switches win over it
            (``ablation_single_head`` keeps its one head per stage).
        recipe: :class:`TrainConfig` fields shared by all variants (over the defaults).
        data_dir: ImageFolder root; None generates the built-in task in ``output/study_data``.
        jobs: variants trained at once, each in its own process.
        threads: CPU threads per training process (default: the CPU count divided by ``jobs``).
        bench_batch, bench_rounds: batch and interleaved rounds of the throughput measurement.
        study_data: size of the built-in task (:func:`mlla.tasks.study.data.make_study_dataset` arguments).
    """

    output: Path
    variants: Sequence[str] = ABLATION_VARIANTS
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(STUDY_MODEL_KWARGS))
    recipe: dict[str, Any] = field(default_factory=lambda: dict(STUDY_RECIPE))
    data_dir: str | None = None
    jobs: int = 1
    threads: int | None = None
    device: str = "auto"
    bench_batch: int = 64
    bench_rounds: int = 5
    progress: bool = True
    study_data: dict[str, Any] = field(default_factory=dict)


def variant_config(spec: StudySpec, variant: str) -> TrainConfig:
    """The :class:`TrainConfig` of one variant: the shared recipe and size, its own output folder."""
    kwargs = dict(spec.model_kwargs)
    if variant in ABLATION_VARIANTS:
        overridden = sorted(k for k in variant_switches(variant) if k in kwargs)
        for k in overridden:
            _logger.debug("%s: keeps its own %s (the study's %s=%r is not applied)", variant, k, k, kwargs[k])
            del kwargs[k]
    overrides = dict(
        spec.recipe, model=variant, model_kwargs=kwargs, output=str(Path(spec.output) / variant),
        resume="auto", data_dir=spec.data_dir, device=spec.device, progress=spec.progress and spec.jobs == 1,
    )
    return ClassificationTask.resolve_settings(overrides=overrides)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RUN_ONLY}


def _finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The variant's result if it has finished with this configuration (ValueError if with another)."""
    path = Path(cfg.output) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    saved = _comparable(result["config"])
    now = _comparable(json.loads(json.dumps(cfg.to_dict())))
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(
            f"{path} was trained with other settings ({', '.join(changed)}); use another --output for a new study, "
            f"or delete {cfg.output} to retrain this variant"
        )
    return result


def train_variant(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train (or continue) one variant with :func:`mlla.engine.trainer.fit`; write its
    ``result.json`` when it finishes. Returns the result, or None when it was interrupted."""
    from ...engine.trainer import fit

    out = Path(cfg.output)
    wall_path = out / "study_wall.json"
    earlier = json.loads(wall_path.read_text())["wall_s"] if wall_path.is_file() else 0.0
    start = time.perf_counter()
    summary = fit(cfg)
    wall = earlier + time.perf_counter() - start
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(dict(wall_s=wall))), wall_path)
    if summary["status"] != "finished":
        return None
    last = summary["last"]
    result = dict(
        variant=cfg.model,
        epochs=summary["epoch"],
        top1=last.get("val_top1"),
        top5=last.get("val_top5"),
        ema_top1=last.get("ema_top1"),
        best_top1=summary["best"].get("score"),
        train_loss=last.get("train_loss"),
        wall_s=wall,
        num_classes=_class_count(out),
        config=cfg.to_dict(),
    )
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)), out / "result.json")
    return result


def _class_count(out: Path) -> int:
    """The number of classes a variant's run was trained on (from its last checkpoint)."""
    from ...checkpoint import read_checkpoint

    return len(read_checkpoint(out / "last.pth")["class_to_idx"])


class _Forwarder:
    """Passes SIGTERM/SIGINT on to the training processes and stops new ones from starting."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        _logger.warning("%s received: stopping the running variants after their current step", signal.Signals(signum).name)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def __enter__(self) -> "_Forwarder":
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _run_parallel(spec: StudySpec, pending: list[TrainConfig], bar: Any) -> bool:
    """Train ``pending`` variants ``spec.jobs`` at a time in child processes; True if all finished."""
    threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.jobs)
    gpus = torch.cuda.device_count() if spec.device != "cpu" else 0
    if not gpus and spec.jobs * threads > (os.cpu_count() or 1):
        _logger.warning("%d jobs x %d threads on %d CPUs: the processes will slow each other down",
                        spec.jobs, threads, os.cpu_count() or 1)
    queue = list(pending)
    running: dict[int, tuple[subprocess.Popen, TrainConfig, Any]] = {}
    ok = True
    with _Forwarder() as forwarder:
        while queue or running:
            free = [s for s in range(spec.jobs) if s not in running]
            while queue and free and not forwarder.requested:
                slot, cfg = free.pop(0), queue.pop(0)
                out = Path(cfg.output)
                out.mkdir(parents=True, exist_ok=True)
                save_yaml(cfg, out / "study_config.yaml")
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = open(out / "train.log", "a")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mlla.tasks.study.ablate", "--train-variant", str(out / "study_config.yaml"),
                     "--threads", str(threads)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )
                forwarder.procs.append(proc)
                running[slot] = (proc, cfg, log)
                _logger.info("%s: training in process %d (log %s)", cfg.model, proc.pid, out / "train.log")
            if forwarder.requested:
                queue.clear()
            time.sleep(0.5)
            for slot, (proc, cfg, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                if (Path(cfg.output) / "result.json").is_file():
                    bar.update(1)
                    _logger.info("%s: finished", cfg.model)
                else:
                    ok = False
                    _logger.warning("%s: stopped before finishing (exit code %d, see %s)", cfg.model, proc.returncode,
                                    Path(cfg.output) / "train.log")
    return ok and not forwarder.requested


def run_study(spec: StudySpec) -> list[dict[str, Any]] | None:
    """Train every variant of ``spec`` that has not finished, then measure and write the results.

    Returns the table's rows, or None when the study was interrupted (rerun it to continue:
    finished variants are kept, an interrupted one resumes from its last checkpoint).
    """
    from tqdm import tqdm

    if not spec.variants:
        raise ValueError("no variants to train; pass --variants NAME [NAME ...] (see `mlla models ablation_*`)")
    unknown = [v for v in spec.variants if v not in DESIGNS and not _is_registered(v)]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; see `mlla models`")
    if spec.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {spec.jobs}")
    output = Path(spec.output)
    output.mkdir(parents=True, exist_ok=True)
    if spec.data_dir is None:
        from .data import make_study_dataset

        spec.data_dir = str(make_study_dataset(output / "study_data", progress=spec.progress, **spec.study_data))
    elif not Path(spec.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {spec.data_dir}: no such folder")
    configs = [variant_config(spec, v) for v in spec.variants]
    results: dict[str, dict[str, Any]] = {}
    pending = []
    for cfg in configs:
        done = _finished(cfg)
        if done is not None:
            _logger.info("%s: finished earlier (%s), not retrained", cfg.model, Path(cfg.output) / "result.json")
            results[cfg.model] = done
        else:
            if (Path(cfg.output) / "last.pth").is_file():
                _logger.info("%s: resuming from %s", cfg.model, Path(cfg.output) / "last.pth")
            pending.append(cfg)
    bar = tqdm(total=len(configs), initial=len(results), desc="study", unit="variant", disable=not spec.progress)
    if spec.jobs == 1:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        for cfg in pending:
            bar.set_postfix_str(cfg.model)
            if train_variant(cfg) is None:
                _logger.warning("study interrupted during %s: rerun the same command to continue", cfg.model)
                bar.close()
                return None
            bar.update(1)
    elif pending and not _run_parallel(spec, pending, bar):
        _logger.warning("study not complete: rerun the same command to continue")
        bar.close()
        return None
    bar.close()
    for cfg in configs:
        results[cfg.model] = json.loads((Path(cfg.output) / "result.json").read_text())
    rows = _rows(spec, configs, results)
    paths = write_study_results(rows, output)
    _logger.info("study results: %s", ", ".join(str(p) for p in paths.values()))
    return rows


def _is_registered(name: str) -> bool:
    import timm

    return timm.is_model(name)


def measure_throughput(
    configs: Sequence[TrainConfig], num_classes: int, *, batch: int = 64, rounds: int = 5, device: str = "cpu",
    min_round_s: float = 0.5, progress: bool = True,
) -> dict[str, float]:
    """Inference images/s of each variant, timed in interleaved rounds (each of about
    ``min_round_s`` per variant); the median per variant."""
    from ...benchmark import make_step, time_interleaved

    dev = torch.device(device)
    steps = {}
    for cfg in configs:
        model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs).to(dev).eval()
        x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=dev)
        steps[cfg.model] = make_step(model, x, "fp32", "infer")

    # Warm-up, then enough calls per round that a round lasts about min_round_s: short load
    # spikes of a shared machine then average out within a round.
    times, _ = time_interleaved(steps, dev, rounds=rounds, warmup=2, min_round_s=min_round_s, progress=progress,
                                desc="throughput (interleaved)")
    return {name: batch / statistics.median(ts) for name, ts in times.items()}


def _rows(spec: StudySpec, configs: Sequence[TrainConfig], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from ...engine.distributed import pick_device
    from ...profiling import count_gmacs, count_params

    num_classes = results[configs[0].model]["num_classes"]
    device = str(pick_device(spec.device))
    speed = measure_throughput(configs, num_classes, batch=spec.bench_batch, rounds=spec.bench_rounds,
                               device=device, progress=spec.progress)
    base = results.get("ablation_baseline", {}).get("top1")
    paper_base = PAPER_RESULTS.get("ablation_baseline", {}).get("top1")
    rows = []
    for cfg in configs:
        with torch.device("meta"):
            model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
        r, paper = results[cfg.model], PAPER_RESULTS.get(cfg.model, {})
        rows.append(dict(
            variant=cfg.model,
            design=DESIGNS.get(cfg.model, cfg.model),
            params_m=count_params(model) / 1e6,
            gmacs=count_gmacs(model, (3, cfg.img_size, cfg.img_size)),
            img_per_s=speed[cfg.model],
            top1=r["top1"],
            top5=r["top5"],
            best_top1=r["best_top1"],
            delta_top1=None if base is None or r["top1"] is None else r["top1"] - base,
            wall_min=r["wall_s"] / 60,
            epochs=r["epochs"],
            paper_params_m=paper.get("params_m"),
            paper_gmacs=paper.get("gmacs"),
            paper_top1=paper.get("top1"),
            paper_delta_top1=None if paper_base is None or "top1" not in paper else paper["top1"] - paper_base,
            num_classes=num_classes,
            img_size=cfg.img_size,
            throughput_batch=spec.bench_batch,
            device=device,
            threads=torch.get_num_threads(),
        ))
    return rows


COLUMNS = [
    "variant", "design", "params_m", "gmacs", "img_per_s", "top1", "top5", "best_top1", "delta_top1", "wall_min",
    "epochs", "paper_params_m", "paper_gmacs", "paper_top1", "paper_delta_top1", "num_classes", "img_size",
    "throughput_batch", "device", "threads",
]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_study_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, the paper's ImageNet figures in the last columns."""
    head = ["variant", "design", "params (M)", "GMACs", "img/s", "top-1", "top-5", "Δ top-1", "wall (min)",
            "paper params (M)", "paper GMACs", "paper ImageNet top-1", "paper Δ top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["design"], _fmt(r["params_m"], ".3f"), _fmt(r["gmacs"], ".4f"), _fmt(r["img_per_s"], ".0f"),
            _fmt(r["top1"], ".1f"), _fmt(r["top5"], ".1f"), _fmt(r["delta_top1"], "+.1f"), _fmt(r["wall_min"], ".1f"),
            _fmt(r["paper_params_m"], ".0f"), _fmt(r["paper_gmacs"], ".1f"), _fmt(r["paper_top1"], ".1f"),
            _fmt(r["paper_delta_top1"], "+.1f"),
        ]) + " |")
    return "\n".join(lines)


def plot_study(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Bar chart: top-1 on the study's data per variant (left) and the change against the
    baseline, study beside paper (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["design"] for r in rows]
    y = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    ax1.barh(y, [r["top1"] or 0.0 for r in rows], color="C0")
    for i, r in enumerate(rows):
        ax1.text((r["top1"] or 0.0) + 0.5, i, _fmt(r["top1"], ".1f"), va="center", fontsize=8)
    if rows and rows[0].get("num_classes"):
        ax1.axvline(100 / rows[0]["num_classes"], color="k", ls="--", lw=0.8, label="chance")
        ax1.legend(fontsize=8, loc="lower right")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 105)
    ax1.set_xlabel("top-1 on this study's validation set (%)")
    h = 0.38
    ax2.barh([i - h / 2 for i in y], [r["delta_top1"] or 0.0 for r in rows], height=h, color="C0", label="this study")
    ax2.barh([i + h / 2 for i in y], [r["paper_delta_top1"] or 0.0 for r in rows], height=h, color="C1",
             label="paper, ImageNet-1K")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("top-1 change against the baseline (points)")
    ax2.legend(fontsize=8, loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def write_study_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``table.md`` and ``chart.png`` atomically."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return {
        "csv": atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), out_dir / "results.csv"),
        "json": atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(list(rows), indent=1)), out_dir / "results.json"),
        "table": atomic_save(lambda tmp: Path(tmp).write_text(format_study_table(rows) + "\n"), out_dir / "table.md"),
        "chart": plot_study(rows, out_dir / "chart.png"),
    }


def _train_variant_main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry of ``jobs > 1``: train the variant of a ``study_config.yaml``."""
    parser = argparse.ArgumentParser(description="internal: train one variant of `mlla ablate`")
    parser.add_argument("--train-variant", required=True, help="the variant's study_config.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import mlla  # noqa: F401  (registers the models)

    cfg = ClassificationTask.resolve_settings(yaml_path=args.train_variant)
    return 0 if train_variant(cfg) is not None else 1


if __name__ == "__main__":
    sys.exit(_train_variant_main())
