"""`mlla ablate`: seeds, aggregation, the study folder's key, wall time, and the built-in task."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlla.cli import main
from mlla.tasks.study.ablate import STUDY_MODEL_KWARGS, StudySpec, _check_input, _finished, model_kwargs_for, run_study, variant_config
from mlla.tasks.study.data import STUDY_CLASSES, STUDY_GROUPS, make_study_dataset
from mlla.tasks.study.manifest import StudyMismatch, WallClock, check_manifest, data_fingerprint, wall_seconds
from mlla.tasks.study.report import AGGREGATE_COLUMNS, RUN_COLUMNS, aggregate, paper_agreement
from mlla.tasks.study.stats import spearman, summarize, t_quantile

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 1))
TINY_ARGS = ["--model-kwargs", "embed_dim=8", "depths=1,1,1", "num_heads=1,1,1"]


# ------------------------------------------------------------------------------ statistics

def test_t_quantiles_match_the_tables() -> None:
    for df, expected in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_seeds_aggregate_into_mean_std_interval_and_paired_changes_exactly() -> None:
    fake = {  # variant -> seed -> (last top-1, best top-1, relational, counting)
        "ablation_baseline": {0: (40.0, 42.0, 30.0, 50.0), 1: (44.0, 45.0, 36.0, 52.0), 2: (42.0, 42.0, 33.0, 51.0)},
        "ablation_forget_gate": {0: (50.0, 50.0, 45.0, 55.0), 1: (55.0, 56.0, 50.0, 60.0), 2: (51.0, 52.0, 46.0, 56.0)},
        "ablation_shortcut": {0: (41.0, 42.0, 30.0, 52.0), 1: (43.0, 45.0, 34.0, 52.0)},
    }
    runs = [dict(variant=v, seed=s, top1=a, best_top1=b, relational_top1=r, counting_top1=c, epochs=10,
                 num_classes=8, wall_min=2.0, cpu_s_per_epoch=10.0 + s)
            for v, seeds in fake.items() for s, (a, b, r, c) in seeds.items()]
    variants = [dict(variant=v, design=v, params_m=0.3, gmacs=0.001, img_per_s=100.0,
                     paper_delta_top1={"ablation_baseline": 0.0, "ablation_forget_gate": 0.8, "ablation_shortcut": 0.2}[v])
                for v in fake]
    rows = {r["variant"]: r for r in aggregate(runs, variants)}
    assert list(rows) == list(fake) and set(AGGREGATE_COLUMNS) == set(rows["ablation_baseline"])
    base, fg, sc = rows["ablation_baseline"], rows["ablation_forget_gate"], rows["ablation_shortcut"]
    t2 = 4.302652729911275  # t(0.975, 2)
    assert base["seeds"] == 3 and base["top1_mean"] == pytest.approx(42.0) and base["top1_std"] == pytest.approx(2.0)
    assert base["top1_low"] == pytest.approx(42.0 - t2 * 2 / math.sqrt(3), abs=1e-9)
    assert base["top1_high"] == pytest.approx(42.0 + t2 * 2 / math.sqrt(3), abs=1e-9)
    assert base["best_top1_mean"] == pytest.approx(43.0) and base["best_top1_std"] == pytest.approx(math.sqrt(3))
    # paired per seed: forget gate - baseline = 10, 11, 9 -> mean 10, std 1
    assert fg["delta_top1_mean"] == pytest.approx(10.0)
    assert fg["delta_top1_low"] == pytest.approx(10.0 - t2 / math.sqrt(3), abs=1e-9) and fg["delta_top1_excludes_zero"]
    # best epoch: 8, 11, 10 -> mean 29/3
    assert fg["delta_best_top1_mean"] == pytest.approx(29 / 3)
    # shortcut has seeds 0 and 1 only: differences 1, -1 -> mean 0, interval includes zero (t(0.975, 1) = 12.706)
    assert sc["seeds"] == 2 and sc["delta_top1_mean"] == pytest.approx(0.0)
    assert sc["delta_top1_high"] == pytest.approx(12.7062047, abs=1e-4)  # t(0.975, 1) * sqrt(2) / sqrt(2)
    assert not sc["delta_top1_excludes_zero"]
    assert fg["relational_top1_mean"] == pytest.approx(47.0) and fg["counting_top1_mean"] == pytest.approx(57.0)
    assert base["wall_min"] == pytest.approx(6.0) and base["cpu_s_per_epoch"] == pytest.approx(11.0)
    verdicts, rho, n = paper_agreement(list(rows.values()))
    assert dict(verdicts) == {"ablation_forget_gate": "agrees", "ablation_shortcut": "no conclusion (interval includes 0)"}
    assert n == 2 and rho is None  # fewer than three designs: no rank correlation
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert summarize([5.0]).std is None and not summarize([5.0]).excludes_zero


# ----------------------------------------------------------------------------- study folder

def test_study_key_names_changed_settings_and_data(tmp_path) -> None:
    data = make_study_dataset(tmp_path / "data", train_per_class=2, val_per_class=1, progress=False)
    first = dict(settings=dict(recipe=dict(epochs=3)), data=data_fingerprint(data))
    study = tmp_path / "study"
    assert check_manifest(study, first) is None and (study / "study.json").is_file()
    assert check_manifest(study, first) is None  # same key: continue
    changed = next((data / "train" / "count_2").iterdir())
    changed.write_bytes(changed.read_bytes() + b"\0")
    (data / "val" / "count_3" / "extra.png").write_bytes(b"x")
    second = dict(settings=dict(recipe=dict(epochs=4)), data=data_fingerprint(data))
    with pytest.raises(StudyMismatch) as e:
        check_manifest(study, second)
    msg = str(e.value)
    assert "recipe.epochs: 3 -> 4" in msg
    assert "train/count_2: same 2 files, other contents" in msg and "val/count_3: 1 -> 2 files" in msg
    (study / "ablation_baseline").mkdir()
    moved = check_manifest(study, second, new_study=True)
    assert moved == study / "previous-1" and (moved / "ablation_baseline").is_dir()
    assert json.loads((moved / "study.json").read_text())["settings"]["recipe"]["epochs"] == 3
    assert json.loads((study / "study.json").read_text())["settings"]["recipe"]["epochs"] == 4


def test_wall_clock_counts_every_part(tmp_path) -> None:
    clock = WallClock(tmp_path, interval_s=0.01)
    time.sleep(0.1)  # a killed process stops here: no stop(), only the heartbeats
    killed = wall_seconds(tmp_path)
    assert killed >= 0.05
    clock._stopped.set()
    clock._thread.join()
    second = WallClock(tmp_path)
    time.sleep(0.02)
    wall, cpu = second.stop()
    parts = json.loads((tmp_path / "wall.json").read_text())["parts"]
    assert len(parts) == 2 and wall == pytest.approx(sum(p[1] - p[0] for p in parts)) and wall >= killed + 0.02
    assert cpu >= 0


def test_variant_sizes_and_input_checks(tmp_path, caplog) -> None:
    spec = StudySpec(output=tmp_path)
    single = variant_config(spec, "ablation_single_head", seed=2)
    assert "num_heads" not in single.model_kwargs and single.seed == 2  # keeps its one head
    base = variant_config(spec, "ablation_baseline", seed=1)
    assert base.model_kwargs == dict(STUDY_MODEL_KWARGS, img_size=32)
    assert base.output == str(tmp_path / "ablation_baseline" / "seed1") and base.resume == "auto"
    caplog.set_level(logging.INFO)
    assert model_kwargs_for("resnet18", dict(STUDY_MODEL_KWARGS), 32) == {}  # a timm model: its own size
    assert "resnet18 does not take the study's depths, embed_dim, num_heads" in caplog.text
    assert model_kwargs_for("vit_tiny_patch16_224", dict(STUDY_MODEL_KWARGS), 32) == dict(img_size=32)
    with pytest.raises(ValueError, match="--img-size 16: the training engine takes 32 px or more"):
        _check_input(StudySpec(output=tmp_path, recipe=dict(img_size=16)))
    small = StudySpec(output=tmp_path, study_data=dict(train_per_class=4), fit_batch=True)
    _check_input(small)
    assert small.recipe["batch_size"] == 4 * len(STUDY_CLASSES)  # the default batch fits small data
    with pytest.raises(ValueError, match="--batch-size 64 is more than the 32 training images"):
        _check_input(StudySpec(output=tmp_path, study_data=dict(train_per_class=4)))


def test_finished_run_with_other_settings_is_an_error(tmp_path) -> None:
    cfg = variant_config(StudySpec(output=tmp_path), "ablation_baseline")
    out = Path(cfg.output)
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(dict(config=dict(cfg.to_dict(), epochs=99))))
    with pytest.raises(ValueError, match="other settings \\(epochs\\)"):
        _finished(cfg)


def test_study_dataset_is_deterministic_and_complete(tmp_path) -> None:
    a = make_study_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, img_size=32, progress=False)
    b = make_study_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, img_size=32, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * len(STUDY_CLASSES) and len(STUDY_CLASSES) == 8
    assert set(STUDY_GROUPS["relational"]) | set(STUDY_GROUPS["counting"]) == set(STUDY_CLASSES)
    assert sorted(p.name for p in (a / "val").iterdir()) == sorted(STUDY_CLASSES)
    assert data_fingerprint(a) == data_fingerprint(b)
    marker = json.loads((a / "study_dataset.json").read_text())
    assert marker["train_per_class"] == 2 and marker["seed"] == 0
    mtime = (a / files[0]).stat().st_mtime_ns
    make_study_dataset(a, train_per_class=2, val_per_class=1, img_size=32, progress=False)  # complete: kept
    assert (a / files[0]).stat().st_mtime_ns == mtime


# ------------------------------------------------------------------- real (tiny) studies

def _spec(out: Path, seeds, **kw) -> StudySpec:
    recipe = dict(StudySpec(output=out).recipe, epochs=1, batch_size=16, warmup_epochs=0)
    return StudySpec(output=out, variants=["ablation_baseline", "ablation_shortcut"], seeds=seeds, model_kwargs=dict(TINY),
                     recipe=recipe, study_data=dict(train_per_class=2, val_per_class=1), bench_rounds=1,
                     progress=False, **kw)


def test_adding_a_seed_trains_only_the_new_runs_and_changed_data_is_refused(tmp_path, caplog) -> None:
    out = tmp_path / "study"
    rows = run_study(_spec(out, [0]))
    assert [r["seeds"] for r in rows] == [1, 1]
    first = out / "ablation_baseline" / "seed0"
    kept = {p: p.stat().st_mtime_ns for p in (first / "result.json", first / "last.pth")}
    caplog.set_level(logging.INFO)
    rows = run_study(_spec(out, [0, 1]))
    assert "ablation_baseline seed 0: finished earlier" in caplog.text
    assert "ablation_shortcut seed 0: finished earlier" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not retrained
    assert (out / "ablation_shortcut" / "seed1" / "result.json").is_file()
    assert [r["seeds"] for r in rows] == [2, 2] and rows[1]["delta_top1_low"] is not None
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert list(runs[0]) == RUN_COLUMNS and len(runs) == 4
    assert {(r["variant"], r["seed"]) for r in runs} == {(v, s) for v in ("ablation_baseline", "ablation_shortcut")
                                                        for s in ("0", "1")}
    result = json.loads((first / "result.json").read_text())
    assert 0 <= result["relational_top1"] <= 100 and 0 <= result["counting_top1"] <= 100
    # relational and counting classes have one validation image each here: overall = their mean
    assert result["top1"] == pytest.approx((result["relational_top1"] + result["counting_top1"]) / 2)
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.md").read_text().count("| ablation_") == 2

    before = (out / "study_data" / "study_dataset.json").read_text()
    bigger = _spec(out, [0])
    bigger.study_data["train_per_class"] = 3
    with pytest.raises(StudyMismatch, match=r"study_data.train_per_class: 2 -> 3"):
        run_study(bigger)
    assert (out / "study_data" / "study_dataset.json").read_text() == before  # the old study's data untouched
    assert main(["ablate", "--output", str(out), "--report"]) == 0  # rebuilt from runs.csv, nothing trained
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


@pytest.mark.slow  # a study started in a subprocess, SIGKILLed, then resumed: 20-40 s on 2 shared cores
def test_wall_time_after_sigkill_includes_the_lost_part(tmp_path, caplog) -> None:
    out = tmp_path / "study"
    recipe = tmp_path / "recipe.yaml"
    # Enough epochs that the run cannot finish in the seconds before the kill, even on an idle machine.
    recipe.write_text("epochs: 40\nbatch_size: 16\nsave_every_steps: 1\nwarmup_epochs: 0\n")
    args = ["ablate", "--output", str(out), "--variants", "ablation_baseline", "--seeds", "0", *TINY_ARGS,
            "--config", str(recipe), "--train-per-class", "8", "--val-per-class", "1", "--bench-rounds", "1",
            "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlla.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "ablation_baseline" / "seed0"
    try:
        deadline = time.monotonic() + 300
        while not (run / "last.pth").is_file():  # some steps taken
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = time.time()
        time.sleep(3.0)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "result.json").is_file()
    killed = json.loads((run / "wall.json").read_text())["parts"]
    assert len(killed) == 1
    assert killed[0][1] >= seen  # heartbeats (every second, 3 s of slack for a loaded machine) went on past the checkpoint
    caplog.set_level(logging.INFO)
    assert main(args) == 0
    assert "ablation_baseline seed 0: resuming from" in caplog.text
    parts = json.loads((run / "wall.json").read_text())["parts"]
    result = json.loads((run / "result.json").read_text())
    assert len(parts) == 2 and parts[0] == killed[0]
    assert result["wall_s"] == pytest.approx(sum(p[1] - p[0] for p in parts))
    assert result["wall_s"] > parts[1][1] - parts[1][0] + 0.5  # the killed part is counted
    with open(out / "runs.csv") as f:
        assert float(next(csv.DictReader(f))["wall_min"]) == pytest.approx(result["wall_s"] / 60)
