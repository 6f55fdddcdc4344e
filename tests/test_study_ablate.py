"""`mlla ablate` and the built-in study task."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlla.cli import main
from mlla.tasks.study.data import STUDY_CLASSES, make_study_dataset
from mlla.tasks.study.ablate import COLUMNS, STUDY_MODEL_KWARGS, StudySpec, _finished, variant_config

SRC = Path(__file__).resolve().parents[1] / "src"


def test_study_dataset_is_deterministic_and_complete(tmp_path) -> None:
    a = make_study_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, img_size=32, progress=False)
    b = make_study_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, img_size=32, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * len(STUDY_CLASSES) and len(STUDY_CLASSES) == 8
    assert sorted(p.name for p in (a / "val").iterdir()) == sorted(STUDY_CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    marker = json.loads((a / "study_dataset.json").read_text())
    assert marker["train_per_class"] == 2 and marker["seed"] == 0
    mtime = (a / files[0]).stat().st_mtime_ns
    make_study_dataset(a, train_per_class=2, val_per_class=1, img_size=32, progress=False)  # complete: kept
    assert (a / files[0]).stat().st_mtime_ns == mtime


def test_variant_keeps_its_own_switches_over_the_shared_size(tmp_path) -> None:
    spec = StudySpec(output=tmp_path)
    single = variant_config(spec, "ablation_single_head")
    assert "num_heads" not in single.model_kwargs  # keeps (1, 1, 1, 1) from its registration
    base = variant_config(spec, "ablation_baseline")
    assert base.model_kwargs == STUDY_MODEL_KWARGS
    assert base.output == str(tmp_path / "ablation_baseline") and base.resume == "auto"


def test_finished_variant_with_other_settings_is_an_error(tmp_path) -> None:
    cfg = variant_config(StudySpec(output=tmp_path), "ablation_baseline")
    out = Path(cfg.output)
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(dict(config=dict(cfg.to_dict(), epochs=99))))
    with pytest.raises(ValueError, match="other settings \\(epochs\\)"):
        _finished(cfg)


@pytest.mark.slow  # a study started in a subprocess, killed, then resumed: 25-50 s on 2 shared cores
def test_two_variant_study_is_killed_after_the_first_and_resumed(tmp_path, caplog) -> None:
    out = tmp_path / "study"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nbatch_size: 16\nsave_every_steps: 1\n")
    args = ["ablate", "--output", str(out), "--variants", "ablation_baseline", "ablation_shortcut",
            "--model-kwargs", "embed_dim=8", "depths=1,1,1,1", "num_heads=1,1,1,1", "--config", str(recipe),
            "--train-per-class", "8", "--val-per-class", "2", "--bench-rounds", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlla.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = out / "ablation_baseline", out / "ablation_shortcut"
    try:
        deadline = time.monotonic() + 300
        while not (second / "last.pth").is_file():  # the first has finished, the second has taken a step
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (first / "result.json").is_file()
    assert not (second / "result.json").is_file()
    kept = {p: p.stat().st_mtime_ns for p in (first / "result.json", first / "last.pth", first / "metrics.jsonl")}
    before = json.loads((first / "result.json").read_text())

    caplog.set_level(logging.INFO)
    assert main(args) == 0
    assert "ablation_baseline: finished earlier" in caplog.text
    assert "ablation_shortcut: resuming from" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not retrained
    assert json.loads((first / "result.json").read_text()) == before
    assert json.loads((second / "result.json").read_text())["epochs"] == 3

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [r["variant"] for r in rows] == ["ablation_baseline", "ablation_shortcut"]
    for r in rows:
        assert float(r["params_m"]) > 0 and float(r["gmacs"]) > 0 and float(r["img_per_s"]) > 0
        assert 0 <= float(r["top1"]) <= 100 and float(r["top1"]) <= float(r["top5"]) <= 100
        assert float(r["wall_min"]) > 0 and r["epochs"] == "3"
    assert float(rows[1]["params_m"]) > float(rows[0]["params_m"])  # the shortcut's D
    assert float(rows[0]["paper_top1"]) == 77.6 and float(rows[1]["paper_top1"]) == 77.8
    assert float(rows[0]["delta_top1"]) == 0.0
    assert rows[0]["top1"] == str(before["top1"])
    table = (out / "table.md").read_text()
    assert table.count("| ablation_") == 2 and "paper ImageNet top-1" in table
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
