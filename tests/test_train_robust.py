"""Training survives real runs: settings checked before any work, failed runs leave no folder,
a SIGKILL leaves nothing that breaks the next run, Ctrl-C is reported once."""
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
import torch

import mlla
from mlla.data import available_cores, default_workers
from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.engine import fit
from mlla.tasks.classification.settings import ClassificationConfig
from mlla.engine.preflight import SettingsError, check_attention_backend_applies, check_settings


def _config(data: Path | None, output: Path, **kw) -> ClassificationConfig:
    base = dict(
        model="test_mlla", data_dir=None if data is None else str(data), output=str(output), epochs=2, batch_size=4,
        img_size=32, workers=0, progress=False, amp=False, lr=1e-3, warmup_epochs=0.5, crop_pct=1.0, model_ema=False,
    )
    return ClassificationConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    """4 classes x 4 training images (4 steps of 4), 2 validation images per class."""
    return make_demo_dataset(tmp_path_factory.mktemp("data4"), 4, 2, classes=DEMO_CLASSES[:4], progress=False)


@pytest.mark.parametrize("setting,match", [
    (dict(epochs=0), "--epochs must be a whole number of at least 1, got 0"),
    (dict(epochs=-3), "--epochs"),
    (dict(batch_size=0), "--batch-size must be"),
    (dict(lr=-1e-3), "--lr must be a positive number"),
    (dict(lr=math.nan), "--lr must be a positive number"),
    (dict(img_size=16), "--img-size must be a whole number of at least 32"),
    (dict(workers=-1), "--workers must be 0"),
    (dict(max_failed_fraction=2.0), r"--max-failed-fraction must lie in \[0, 1\]"),
    (dict(compile_mode="max-autotune"), "--compile-mode max-autotune only apply with --compile"),
    (dict(compile=True, compile_backend="inductr"), "'inductr' is not a torch.compile backend; use inductor"),
    (dict(compile=True, compile_backend="aot_eager", compile_mode="max-autotune"), "a mode of the inductor backend"),
    (dict(compile=True, compile_mode="reduce-overhead"), "reduce-overhead replays CUDA graphs, which need a GPU"),
])
def test_bad_settings_are_refused_before_any_work(data4, tmp_path, setting, match):
    out = tmp_path / "run"
    with pytest.raises(SettingsError, match=match):
        fit(_config(data4, out, **setting))
    assert not out.exists()


def test_an_attention_backend_that_cannot_apply_is_refused(data4, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel on a CPU only in Triton's interpreter
    out = tmp_path / "run"
    with pytest.raises(SettingsError, match="--attention-backend triton (runs the fused kernel on CUDA, and this runs on cpu|needs Triton)"):
        fit(_config(data4, out, attention_backend="triton", device="cpu"))
    assert not out.exists()
    # The ablation models' attention is another layer, which the setting does not switch: refused
    # before any work (no demo data generated).
    with pytest.raises(SettingsError, match="--attention-backend torch applies to models with MLLA's attention .*ablation_baseline has none"):
        fit(_config(None, out, model="ablation_baseline", attention_backend="torch"))
    assert not out.exists()
    # A task whose model is not the registered one as it is (Mask R-CNN around a backbone) checks once it is built.
    with pytest.raises(SettingsError, match="has none; leave it out"):
        check_attention_backend_applies("triton", torch.nn.Linear(2, 2), "a Linear")
    check_attention_backend_applies("triton", mlla.create_model("test_mlla"), "test_mlla")
    check_attention_backend_applies("auto", torch.nn.Linear(2, 2), "a Linear")


def test_bad_output_and_data_are_refused_with_what_to_do(data4, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(SettingsError, match="is an existing file, not a folder"):
        fit(_config(data4, afile))
    with pytest.raises(SettingsError, match="is a file, so no folder can be made under it"):
        fit(_config(data4, afile / "run"))
    out = tmp_path / "run"
    with pytest.raises(SettingsError, match="does not exist or is not a folder"):
        fit(_config(tmp_path / "nope", out))
    (tmp_path / "d" / "val").mkdir(parents=True)
    with pytest.raises(SettingsError, match="has no 'train' folder \\(found: val\\)"):
        fit(_config(tmp_path / "d", out))
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "train" / "dog").mkdir()
    with pytest.raises(SettingsError, match="holds no images in class folders"):
        fit(_config(tmp_path / "d", out))
    (tmp_path / "d" / "train" / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(SettingsError, match="one class only \\(cat\\).*learns nothing"):
        fit(_config(tmp_path / "d", out))
    assert not out.exists() and not (tmp_path / "d" / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_is_refused(data4, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SettingsError, match="not writable"):
        fit(_config(data4, locked / "run"))


def test_ineffective_settings_warn_with_the_fix(data4, caplog):
    cfg = ClassificationConfig(model="test_mlla", data_dir=str(data4), epochs=5, warmup_epochs=20, batch_size=8,
                      workers=available_cores() + 3)
    with caplog.at_level(logging.WARNING, logger="mlla"):
        warnings = check_settings(cfg)
    text = " ".join(warnings)
    assert "covers the whole run of 5 epochs" in text and "--warmup-epochs 0.5" in text
    assert "peak learning rate is 7.8e-06" in text and "--lr 0.0005" in text and "--lr-base-size 8" in text
    assert f"more than the {available_cores()} CPU cores" in text and f"-j {default_workers()}" in text
    assert len(caplog.records) == 3
    ok = ClassificationConfig(model="test_mlla", data_dir=str(data4), epochs=30, warmup_epochs=2, batch_size=8, lr=1e-3)
    assert check_settings(ok) == []
    assert 1 <= default_workers() <= min(4, available_cores())


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(data4, tmp_path):
    out = tmp_path / "runs" / "r1"
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(_config(data4, out, batch_size=64))
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(_config(data4, existing, batch_size=64))
    assert (existing / "notes.txt").read_text() == "keep me"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_clears_temp_files_and_a_cut_metrics_line(data4, tmp_path):
    out = tmp_path / "run"
    fit(_config(data4, out, epochs=1))
    (out / ".last.pth.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 8, "lr": 0.00')  # killed mid-write
    summary = fit(_config(data4, out, epochs=2, resume="auto"))
    assert summary["status"] == "finished"
    assert not list(out.glob(".*.tmp"))
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in rows]


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlla.cli", "train", "--model", "test_mlla", "--data-dir", str(data), "--output", str(out),
            "--epochs", "5", "-b", "4", "--img-size", "32", "--no-amp", "--no-progress", "--lr", "1e-3",
            "--warmup-epochs", "1", "--crop-pct", "1", "--model-ema", "--model-ema-decay", "0.9",
            "--model-ema-decay-batch", "0", *extra]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow  # three training subprocesses: ~30-60 s on 2 shared cores
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(data4, tmp_path):
    # The default recipe's random parts (RandAugment m9-mstd0.5, erasing, Mixup/CutMix) included.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(data4, straight, "-j", "0"), env=_env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(data4, killed, "-j", "0", "--save-every-steps", "1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, step = time.monotonic() + 240, 0
        while step < 6 and time.monotonic() < deadline and proc.poll() is None:  # into epoch 2 (4 steps/epoch)
            time.sleep(0.05)
            try:
                step = torch.load(killed / "last.pth", weights_only=True)["global_step"]
            except (FileNotFoundError, RuntimeError, EOFError):
                pass
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    at_kill = torch.load(killed / "last.pth", weights_only=True)
    assert 6 <= at_kill["global_step"] < 20  # killed mid-run, with whatever it was writing left as it was

    done = subprocess.run(_train_cmd(data4, killed, "-j", "0", "--resume", "auto"), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(killed.glob(".*.tmp"))
    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (straight, killed))
    assert a["global_step"] == b["global_step"] == 20
    for part in ("model", "model_ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    ra, rb = _rows(straight), _rows(killed)
    assert [r["epoch"] for r in rb] == [1, 2, 3, 4, 5]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["val_top1"] for r in ra] == [r["val_top1"] for r in rb]


@pytest.mark.slow  # a training subprocess with 2 workers: ~10-25 s on 2 shared cores
def test_ctrl_c_is_reported_once_not_once_per_worker(data4, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(data4, out, "-j", "2", "--epochs", "1000", "--save-every-steps", "1")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pth").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err.count("SIGINT received") == 1, err
    assert "Traceback" not in err, err


def test_schedule_warnings_once_the_steps_are_known():
    from mlla.engine.preflight import check_schedule

    cfg = ClassificationConfig(model="test_mlla", epochs=2, batch_size=8, warmup_steps=50)  # recipe EMA: 0.9996 at batch 4096
    warnings = check_schedule(cfg, total_batch=8, steps_per_epoch=12, log=False)
    assert len(warnings) == 2
    assert "--warmup-steps 50 covers the whole run of 24 steps" in warnings[0] and "--warmup-steps 2" in warnings[0]
    assert "averages over ~" in warnings[1] and "--model-ema-decay 0.583 --model-ema-decay-batch 0" in warnings[1]
    fine = ClassificationConfig(model="test_mlla", epochs=30, batch_size=8, model_ema_decay=0.9, model_ema_decay_batch=0)
    assert check_schedule(fine, total_batch=8, steps_per_epoch=12, log=False) == []


@pytest.mark.slow  # torchrun with two gloo processes: ~20-40 s on 2 shared cores
def test_failed_samples_are_summed_over_ddp_processes(tmp_path):
    from mlla.engine import save_yaml

    data = make_demo_dataset(tmp_path / "data", 8, 2, classes=DEMO_CLASSES[:4], progress=False)
    broken = sorted((data / "train").rglob("*.png"))[::11]  # 3 of 32, wherever the sampler puts them
    for p in broken:
        p.write_bytes(b"\x89PNG cut short")
    cfg = _config(data, tmp_path / "two", epochs=2, batch_size=4, max_failed_fraction=0.5)
    save_yaml(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mlla", "train", "--config", str(tmp_path / "cfg.yaml")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(tmp_path / "two")
    assert [r["train_skipped"] for r in rows] == [3, 3]  # every broken file, once an epoch, over both processes
    logged = [line for line in result.stderr.splitlines() if "skipping training sample" in line]
    assert sorted({line.split()[5] for line in logged}) == sorted(map(str, broken))
    assert len(logged) <= 2 * len(broken)  # at most once per file and process, not once per epoch
