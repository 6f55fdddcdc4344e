"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same
total batch: DistributedSampler order, gradient averaging, synchronised BatchNorm, reduced metrics."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.engine import fit, save_yaml
from mlla.tasks.classification.settings import ClassificationConfig


@pytest.mark.parametrize("variant", ["eager", pytest.param("compiled", marks=pytest.mark.slow),
                                     pytest.param("kernel", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one_process_with_the_same_total_batch(tmp_path, variant):
    # compiled: the two processes run their step through torch.compile (DDP splits the graph at
    # its gradient buckets), the one process eagerly. kernel: the two processes run MLLA's attention
    # as the fused kernel (Triton's CPU interpreter without CUDA), the one process in PyTorch.
    if variant == "kernel" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the kernel needs CUDA or Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    compiled = variant == "compiled"
    data = make_demo_dataset(tmp_path / "data", 8, 2, classes=DEMO_CLASSES[:4], progress=False)
    # Augmentation and other per-process randomness off; EMA, MESA and clipping on. SGD rather
    # than AdamW: Adam divides by the root of the squared gradients, which turns the last-bit
    # differences of a two-process gradient sum into visible ones for near-zero gradients.
    cfg = ClassificationConfig(
        model="test_mlla", data_dir=str(data), epochs=2, batch_size=8, img_size=32, workers=0, progress=False,
        amp=False, opt="sgd", lr=2e-3, warmup_epochs=0.5, crop_pct=1.0, no_aug=True, mixup=0.0, cutmix=0.0, drop_path=0.0,
        sync_bn=True, model_ema=True, model_ema_decay=0.9, model_ema_decay_batch=0, mesa=1.0, mesa_start=0.5,
    )
    one = tmp_path / "one"
    cfg.output = str(one)
    fit(cfg)

    two = tmp_path / "two"
    save_yaml(cfg, tmp_path / "cfg.yaml")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mlla.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--output", str(two), "--batch-size", "4",
        *(["--compile", "--compile-backend", "aot_eager"] if compiled else []),
        *(["--attention-backend", "triton"] if variant == "kernel" else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x batch 4 = 8 images/step" in result.stderr
    assert ("runs through torch.compile (backend aot_eager" in result.stderr) == compiled
    assert ("MLLA's attention runs as the fused Triton kernel" in result.stderr) == (variant == "kernel")

    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (one, two))
    assert a["global_step"] == b["global_step"] == 8
    for part in ("model", "model_ema"):
        for k, v in a[part].items():
            if v.is_floating_point():
                # float32 rounding differs between a batch of 8 and two of 4 (BLAS blocking, SyncBN
                # reductions); after 8 steps that is ~1e-5 on the smallest weights.
                torch.testing.assert_close(b[part][k], v, rtol=1e-4, atol=3e-5, msg=lambda m: f"{part}.{k}: {m}")
            else:
                assert torch.equal(b[part][k], v), f"{part}.{k}"
    rows_a, rows_b = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (one, two))
    assert len(rows_b) == 2  # rank 0 alone writes
    for x, y in zip(rows_a, rows_b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
        assert y["val_top1"] == pytest.approx(x["val_top1"])  # all 8 validation images, counted once


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlla.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout)


@pytest.mark.slow  # two torchrun launches of two gloo processes: ~30 s on 2 shared cores
def test_the_failed_sample_limit_counts_every_process_and_stops_them_all_alike(tmp_path):
    from mlla.data import TooManyFailedSamples

    # 1 unreadable file in 17 validation images: 5.9% of the pass, 1 in 9 (11%) of one process's share.
    data = make_demo_dataset(tmp_path / "data", 4, 4, classes=DEMO_CLASSES[:4], progress=False)
    (data / "val" / DEMO_CLASSES[0] / "zz_broken.png").write_bytes(b"\x89PNG cut short")
    cfg = ClassificationConfig(
        model="test_mlla", data_dir=str(data), epochs=1, batch_size=8, img_size=32, workers=0, progress=False,
        amp=False, opt="sgd", lr=1e-3, warmup_epochs=0, crop_pct=1.0, no_aug=True, mixup=0.0, cutmix=0.0,
        drop_path=0.0, sync_bn=True, model_ema=False, max_failed_fraction=0.08,
    )
    save_yaml(cfg, tmp_path / "cfg.yaml")

    # Under the limit over all processes: both runs finish, with the same validation scores.
    cfg.output = str(tmp_path / "one")
    fit(cfg)
    result = _torchrun(["train", "--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "two"), "--batch-size", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("validation top-1 after") == 1, result.stdout  # reported once, not per process
    rows = [json.loads((tmp_path / p / "metrics.jsonl").read_text().splitlines()[0]) for p in ("one", "two")]
    assert rows[0]["val_skipped"] == rows[1]["val_skipped"] == 1
    # 16 images scored once each: the same hits; the loss to float32 rounding (as above).
    assert rows[1]["val_top1"] == rows[0]["val_top1"]
    assert rows[1]["val_loss"] == pytest.approx(rows[0]["val_loss"], rel=1e-4)

    # Over it: one process and both processes of two stop with the same one-line message.
    cfg.output, cfg.max_failed_fraction = str(tmp_path / "one-strict"), 0.05
    with pytest.raises(TooManyFailedSamples) as raised:
        fit(cfg)
    message = str(raised.value)
    assert message.startswith("1 of the 17 validation samples of this pass failed (5.9%), more than --max-failed-fraction 0.05")
    result = _torchrun(["train", "--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "two-strict"),
                        "--batch-size", "4", "--max-failed-fraction", "0.05"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("mlla train: error:")]
    assert errors == [f"mlla train: error: {message}"] * 2, result.stderr[-3000:]
    # The first process to exit ends with 2 (the CLI's code for bad input); torchrun then ends
    # whichever is still shutting down (SIGTERM), which is torchrun's way, not a second failure.
    assert result.returncode != 0
    codes = re.findall(r"exitcode\s*: (-?\d+)", result.stderr)
    assert codes and set(codes) <= {"2", "-15"} and "2" in codes, result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause")[-1]
    assert re.search(r"exitcode\s*: (-?\d+)", root_cause).group(1) == "2", result.stderr[-3000:]
    for noise in ("gloo", "Connection closed", "DistBackendError"):
        assert noise not in result.stderr
