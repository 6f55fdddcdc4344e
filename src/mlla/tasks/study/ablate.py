"""The paper's design study (Tables 1-2) rerun on any data: every variant trained with one recipe
over several seeds, then summarised with intervals beside the paper's ImageNet figures.

Layout of a study folder ``OUT``::

    OUT/study.json                  the study's key: shared settings and a fingerprint of the data
    OUT/study_data/                 the built-in task (when no --data-dir is given)
    OUT/<variant>/seed<k>/          one training run (mlla.engine.trainer.fit): last.pth, metrics.*,
                                    wall.json (wall time over interrupted parts)
    OUT/<variant>/seed<k>/result.json   written when the run has finished: it is then never retrained
    OUT/runs.csv                    one row per finished run (variant x seed)
    OUT/variants.csv                one row per variant: parameters, GMACs, throughput, paper figures
    OUT/results.csv, results.json, table.md, chart.png   the aggregate (:mod:`mlla.tasks.study.report`)

Every run trains through :func:`mlla.engine.trainer.fit` with ``resume='auto'``: an interrupted
run continues from its ``last.pth``. ``jobs > 1`` trains runs side by side, each in its own
process (its own CPU threads, or its own GPU when there are several). Throughput is measured at
the end for all variants in one interleaved run (rounds ``A B C A B C``), so that load changes
on a shared machine hit all of them alike.
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
from .manifest import WallClock, check_manifest, data_fingerprint

__all__ = [
    "DESIGNS",
    "STUDY_MODEL_KWARGS",
    "STUDY_RECIPE",
    "STUDY_SEEDS",
    "StudySpec",
    "measure_throughput",
    "model_kwargs_for",
    "run_dir",
    "run_study",
    "train_run",
    "variant_config",
]

_logger = logging.getLogger(__name__)

#: What each variant changes, as the paper's tables name it (controls: what they isolate).
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
    "ablation_causal": "control: causal mask only",
    "ablation_forget_gate_bidir": "control: forget gate, both scan directions",
    "ablation_single_head_full_qk": "control: one head, full Q/K width",
    "ablation_block_all_matched": "control: block design (all), parameter-matched",
}

#: The reduced width of the built-in study: 3 stages of 24-96 channels (grids 8x8, 4x4, 2x2 at
#: 32 px), 5 blocks, about 0.3M parameters.
STUDY_MODEL_KWARGS: dict[str, Any] = dict(embed_dim=24, depths=(1, 2, 2), num_heads=(1, 2, 4))

#: Seeds of the default study: three runs per variant.
STUDY_SEEDS: tuple[int, ...] = (0, 1, 2)

#: The shared recipe of the built-in study: short AdamW cosine schedule, no augmentation (a
#: flip or crop would change the task's spatial classes), no EMA, float32 (CPU-friendly).
STUDY_RECIPE: dict[str, Any] = dict(
    epochs=10,
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

# Settings that do not change what a run learns: a finished run is reused across them.
_RUN_ONLY = ("output", "resume", "progress", "workers", "device", "tensorboard", "save_every_steps", "data_dir", "max_failed_fraction",
             "compile", "compile_mode", "compile_backend", "attention_backend")


@dataclass
class StudySpec:
    """What to train and how.

    Attributes:
        output: the study folder.
        variants: registered model names (default: every ablation variant).
        seeds: one run per variant and seed.
        model_kwargs: model size shared by all variants, applied to the models that take it
            (:func:`model_kwargs_for`); a variant's own switches win over it.
        recipe: :class:`TrainConfig` fields shared by all variants (over the defaults).
        data_dir: ImageFolder root; None generates the built-in task in ``output/study_data``.
        jobs: runs trained at once, each in its own process.
        threads: CPU threads per training process (default: the CPU count divided by ``jobs``).
        bench_batch, bench_rounds: batch and interleaved rounds of the throughput measurement.
        study_data: size of the built-in task (:func:`mlla.tasks.study.data.make_study_dataset` arguments).
        fit_batch: lower the recipe's batch to the training set's size when it is larger (the
            default batch on small data); otherwise such a batch is an error.
        new_study: a folder holding a study of other settings or data is moved aside, not refused.
    """

    output: Path
    variants: Sequence[str] = ABLATION_VARIANTS
    seeds: Sequence[int] = STUDY_SEEDS
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
    fit_batch: bool = False
    new_study: bool = False


def _builds(name: str, kwargs: dict[str, Any], img_size: int) -> str | None:
    """None if ``name`` builds with ``kwargs`` and takes an ``img_size`` input, else why not."""
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=2, **kwargs)
            model.eval()(torch.empty(1, 3, img_size, img_size))
    except Exception as e:  # any failure means: not with these settings
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def model_kwargs_for(variant: str, shared: dict[str, Any], img_size: int) -> dict[str, Any]:
    """The model arguments of ``variant`` in a study of size ``shared`` at ``img_size``.

    An ablation variant takes the shared size minus its own switches (``ablation_single_head``
    keeps its one head) and ``img_size`` (its APE tables). Any other registered model takes the
    shared size and ``img_size`` only if it builds and runs with them, else each alone, else
    neither (logged): a timm ResNet ignores ``embed_dim``, a ViT takes ``img_size``.
    """
    if variant in ABLATION_VARIANTS:
        own = variant_switches(variant)
        dropped = sorted(k for k in shared if k in own)
        if dropped:
            _logger.debug("%s: keeps its own %s over the study's", variant, ", ".join(dropped))
        return dict({k: v for k, v in shared.items() if k not in own}, img_size=img_size)
    reasons = []
    for candidate in (dict(shared, img_size=img_size), dict(shared), dict(img_size=img_size), {}):
        why = _builds(variant, candidate, img_size)
        if why is None:
            left = sorted(set(shared) - set(candidate))
            if left:
                _logger.info("%s does not take the study's %s (%s): it trains at its registered size",
                             variant, ", ".join(left), reasons[0])
            return candidate
        reasons.append(why)
    raise ValueError(f"{variant} cannot be trained at {img_size} px: {reasons[-1]}")


def run_dir(output: str | os.PathLike, variant: str, seed: int) -> Path:
    """The folder of one run of a study."""
    return Path(output) / variant / f"seed{seed}"


def variant_config(spec: StudySpec, variant: str, seed: int = 0) -> TrainConfig:
    """The :class:`TrainConfig` of one run: the shared recipe, the variant's size, its seed and folder."""
    overrides = dict(
        spec.recipe, model=variant, seed=seed,
        model_kwargs=model_kwargs_for(variant, spec.model_kwargs, spec.recipe.get("img_size", 224)),
        output=str(run_dir(spec.output, variant, seed)), resume="auto", data_dir=spec.data_dir, device=spec.device,
        progress=spec.progress and spec.jobs == 1,
    )
    return ClassificationTask.resolve_settings(overrides=overrides)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RUN_ONLY}


def _finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's result if it has finished with this configuration (ValueError if with another)."""
    path = Path(cfg.output) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    saved = _comparable(result["config"])
    now = _comparable(json.loads(json.dumps(cfg.to_dict())))
    # compared where both record a setting: one on one side only was added or dropped by the library since
    changed = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if changed:
        raise ValueError(
            f"{path} was trained with other settings ({', '.join(changed)}); use another --output for a new study, "
            f"or delete {cfg.output} to retrain this run"
        )
    return result


def train_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train (or continue) one run with :func:`mlla.engine.trainer.fit`; write its
    ``result.json`` when it finishes. Returns the result, or None when it was interrupted."""
    from ...engine.trainer import fit
    from .evaluate import evaluate_groups

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    clock = WallClock(out)
    try:
        summary = fit(cfg)
    finally:
        wall_s, cpu_s = clock.stop()
    if summary["status"] != "finished":
        return None
    last = summary["last"]
    groups = evaluate_groups(out / "last.pth")
    result = dict(
        variant=cfg.model,
        seed=cfg.seed,
        epochs=summary["epoch"],
        top1=last.get("val_top1"),
        top5=last.get("val_top5"),
        best_top1=summary["best"].get("score"),
        best_epoch=summary["best"].get("epoch"),
        train_loss=last.get("train_loss"),
        **{f"{g}_top1": v for g, v in groups["groups"].items()},
        wall_s=wall_s,
        cpu_s=cpu_s,
        num_classes=groups["num_classes"],
        config=cfg.to_dict(),
    )
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)), out / "result.json")
    return result


class _Forwarder:
    """Passes SIGTERM/SIGINT on to the training processes and stops new ones from starting."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        _logger.warning("%s received: stopping the running runs after their current step", signal.Signals(signum).name)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def __enter__(self) -> "_Forwarder":
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _name(cfg: TrainConfig) -> str:
    return f"{cfg.model} seed {cfg.seed}"


def _run_parallel(spec: StudySpec, pending: list[TrainConfig], bar: Any) -> bool:
    """Train ``pending`` runs ``spec.jobs`` at a time in child processes; True if all finished."""
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
                    [sys.executable, "-m", "mlla.tasks.study.ablate", "--train-run", str(out / "study_config.yaml"),
                     "--threads", str(threads)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )
                forwarder.procs.append(proc)
                running[slot] = (proc, cfg, log)
                _logger.info("%s: training in process %d (log %s)", _name(cfg), proc.pid, out / "train.log")
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
                    _logger.info("%s: finished", _name(cfg))
                else:
                    ok = False
                    _logger.warning("%s: stopped before finishing (exit code %d, see %s)", _name(cfg), proc.returncode,
                                    Path(cfg.output) / "train.log")
    return ok and not forwarder.requested


def _check_input(spec: StudySpec) -> None:
    """Refuse an image size the engine cannot train; fit the batch to a small training set."""
    from ..classification.task import MIN_IMG_SIZE
    from .data import STUDY_CLASSES

    img_size = spec.recipe.get("img_size", 224)
    if img_size < MIN_IMG_SIZE:
        raise ValueError(f"--img-size {img_size}: the training engine takes {MIN_IMG_SIZE} px or more; "
                         f"use --img-size {MIN_IMG_SIZE}")
    if spec.data_dir is None:
        n_train = spec.study_data.get("train_per_class", 500) * len(STUDY_CLASSES)
    elif (Path(spec.data_dir) / "train").is_dir():
        n_train = sum(1 for p in (Path(spec.data_dir) / "train").rglob("*") if p.is_file())
    else:
        raise FileNotFoundError(f"--data-dir {spec.data_dir}: no such folder, or no train/ in it")
    batch = spec.recipe.get("batch_size", 128)
    if n_train < batch:
        if not spec.fit_batch:
            raise ValueError(f"--batch-size {batch} is more than the {n_train} training images; "
                             f"use --batch-size {n_train} or less")
        _logger.warning("batch %d lowered to the %d training images (the learning rate scales with it)", batch, n_train)
        spec.recipe["batch_size"] = n_train


def _prepare_data(spec: StudySpec) -> Path:
    """The study's data folder, the built-in task generated there if needed."""
    from .data import make_study_dataset

    if spec.data_dir is None:
        data = dict(spec.study_data, img_size=spec.recipe.get("img_size", 224))
        spec.data_dir = str(make_study_dataset(Path(spec.output) / "study_data", progress=spec.progress, **data))
    return Path(spec.data_dir)


def study_settings(spec: StudySpec) -> dict[str, Any]:
    """The settings every run of a study shares (``study.json``; no variants or seeds)."""
    from .data import study_dataset_settings

    recipe = _comparable(variant_config(spec, "ablation_baseline").to_dict())
    for key in ("model", "seed", "model_kwargs"):  # per run: the study's size is kept as given
        recipe.pop(key)
    settings: dict[str, Any] = dict(recipe=recipe, model_kwargs=json.loads(json.dumps(spec.model_kwargs)))
    if spec.data_dir is None:
        settings["study_data"] = study_dataset_settings(**dict(spec.study_data, img_size=spec.recipe.get("img_size", 224)))
    return settings


def run_study(spec: StudySpec) -> list[dict[str, Any]] | None:
    """Train every run (variant x seed) of ``spec`` that has not finished, then measure and write
    the results.

    Returns the aggregate table's rows, or None when the study was interrupted (rerun it to
    continue: finished runs are kept, an interrupted one resumes from its last checkpoint).

    Raises:
        StudyMismatch: the folder holds a study of other settings or data (and not ``new_study``).
    """
    from tqdm import tqdm

    from .report import write_study_results

    if not spec.variants:
        raise ValueError("no variants to train; pass --variants NAME [NAME ...] (see `mlla models ablation_*`)")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {list(spec.seeds)}")
    unknown = [v for v in spec.variants if not _is_registered(v)]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; see `mlla models`")
    if spec.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {spec.jobs}")
    Path(spec.output).mkdir(parents=True, exist_ok=True)
    _check_input(spec)
    settings = study_settings(spec)
    # Settings first, before the built-in task is (re)generated over the data of another study.
    moved = check_manifest(spec.output, dict(settings=settings), new_study=spec.new_study)
    data_root = _prepare_data(spec)
    moved = check_manifest(spec.output, dict(settings=settings, data=data_fingerprint(data_root)),
                           new_study=spec.new_study) or moved
    if moved is not None:
        _logger.warning("the earlier study (other settings or data) was moved to %s", moved)
        if spec.data_dir == str(moved / "study_data"):  # the built-in task went with it: make it anew
            spec.data_dir = None
            data_root = _prepare_data(spec)
            check_manifest(spec.output, dict(settings=settings, data=data_fingerprint(data_root)))
    configs = [variant_config(spec, v, s) for s in spec.seeds for v in spec.variants]
    pending = []
    done = 0
    for cfg in configs:
        if _finished(cfg) is not None:
            _logger.info("%s: finished earlier (%s), not retrained", _name(cfg), Path(cfg.output) / "result.json")
            done += 1
        else:
            if (Path(cfg.output) / "last.pth").is_file():
                _logger.info("%s: resuming from %s", _name(cfg), Path(cfg.output) / "last.pth")
            pending.append(cfg)
    bar = tqdm(total=len(configs), initial=done, desc="study", unit="run", disable=not spec.progress)
    if spec.jobs == 1:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        for cfg in pending:
            bar.set_postfix_str(_name(cfg))
            if train_run(cfg) is None:
                _logger.warning("study interrupted during %s: rerun the same command to continue", _name(cfg))
                bar.close()
                return None
            bar.update(1)
    elif pending and not _run_parallel(spec, pending, bar):
        _logger.warning("study not complete: rerun the same command to continue")
        bar.close()
        return None
    bar.close()
    results = [json.loads((Path(cfg.output) / "result.json").read_text()) for cfg in configs]
    firsts = [variant_config(spec, v, spec.seeds[0]) for v in spec.variants]
    variants = _variant_rows(spec, firsts, results[0]["num_classes"])
    rows, paths = write_study_results(results, variants, spec.output)
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


def _variant_rows(spec: StudySpec, configs: Sequence[TrainConfig], num_classes: int) -> list[dict[str, Any]]:
    """Per variant: parameters, GMACs, measured throughput and the paper's figures."""
    from ...engine.distributed import pick_device
    from ...profiling import count_gmacs, count_params

    device = str(pick_device(spec.device))
    speed = measure_throughput(configs, num_classes, batch=spec.bench_batch, rounds=spec.bench_rounds,
                               device=device, progress=spec.progress)
    paper_base = PAPER_RESULTS.get("ablation_baseline", {}).get("top1")
    rows = []
    for cfg in configs:
        with torch.device("meta"):
            model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
        paper = PAPER_RESULTS.get(cfg.model, {})
        rows.append(dict(
            variant=cfg.model,
            design=DESIGNS.get(cfg.model, cfg.model),
            params_m=count_params(model) / 1e6,
            gmacs=count_gmacs(model, (3, cfg.img_size, cfg.img_size)),
            img_per_s=speed[cfg.model],
            paper_params_m=paper.get("params_m"),
            paper_gmacs=paper.get("gmacs"),
            paper_top1=paper.get("top1"),
            paper_delta_top1=None if paper_base is None or "top1" not in paper else paper["top1"] - paper_base,
            img_size=cfg.img_size,
            throughput_batch=spec.bench_batch,
            device=device,
            threads=torch.get_num_threads(),
        ))
    return rows


def _train_run_main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry of ``jobs > 1``: train the run of a ``study_config.yaml``."""
    parser = argparse.ArgumentParser(description="internal: train one run of `mlla ablate`")
    parser.add_argument("--train-run", required=True, help="the run's study_config.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import mlla  # noqa: F401  (registers the models)

    cfg = ClassificationTask.resolve_settings(yaml_path=args.train_run)
    return 0 if train_run(cfg) is not None else 1


if __name__ == "__main__":
    sys.exit(_train_run_main())
