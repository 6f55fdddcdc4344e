"""The training loop: learning, bit-exact resume after SIGTERM, NaN stop, bad data, outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlla
from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.engine import fit
from mlla.layers.attention import MllaLinearAttention
from mlla.tasks.classification.settings import ClassificationConfig
from mlla.tasks.classification import task as classification_module


def _config(data: Path, output: Path, **kw) -> ClassificationConfig:
    base = dict(
        model="test_mlla", data_dir=str(data), output=str(output), epochs=2, batch_size=4, img_size=32,
        workers=0, progress=False, amp=False, lr=1e-3, warmup_epochs=0.5, crop_pct=1.0,
    )
    return ClassificationConfig(**{**base, **kw})


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    """4 classes x 4 training images (4 steps of 4), 2 validation images per class."""
    return make_demo_dataset(tmp_path_factory.mktemp("data4"), 4, 2, classes=DEMO_CLASSES[:4], progress=False)


def test_loss_goes_down_and_outputs_are_written(tmp_path):
    data = make_demo_dataset(tmp_path / "data", 8, 2, classes=("circle", "hstripes"), progress=False)
    out = tmp_path / "run"
    cfg = _config(data, out, epochs=5, batch_size=8, no_aug=True, mixup=0.0, cutmix=0.0, smoothing=0.0,
                  lr=3e-3, warmup_epochs=0, model_ema=False, drop_path=0.0)
    summary = fit(cfg)
    rows = _rows(out)
    assert summary["status"] == "finished" and len(rows) == 5
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert {"val_top1", "val_loss", "train_skipped", "lr"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().count("\n") == 6
    for name in ("last.pth", "best.pth", "config.yaml", "metrics.png"):
        assert (out / name).is_file(), name
    assert mlla.engine.load_yaml(out / "config.yaml")["lr"] == 3e-3


def _stop_at(steps: set[int]):
    def on_step(step: int) -> None:
        if step in steps:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


def test_sigterm_then_resume_gives_the_same_weights_bitwise(data4, tmp_path):
    # The full recipe's moving parts: RandAugment, random erasing, Mixup/CutMix, drop path,
    # EMA and MESA, so every random generator and every piece of state must be restored.
    recipe = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, drop_path=0.1,
                  model_ema=True, model_ema_decay=0.9, model_ema_decay_batch=0, mesa=1.0, mesa_start=0.25)
    straight = fit(_config(data4, tmp_path / "a", **recipe))
    assert straight["status"] == "finished"

    out = tmp_path / "b"
    first = fit(_config(data4, out, **recipe), on_step=_stop_at({2}))  # stops after step 3, mid-epoch 1
    assert first["status"] == "interrupted"
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, 3, 3)
    second = fit(_config(data4, out, resume="auto", workers=2, **recipe), on_step=_stop_at({5}))  # after step 6
    assert second["status"] == "interrupted"
    final = fit(_config(data4, out, resume="auto", **recipe))
    assert final["status"] == "finished"

    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (tmp_path / "a", out))
    assert a["global_step"] == b["global_step"] == 8
    for part in ("model", "model_ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    ra, rb = _rows(tmp_path / "a"), _rows(out)
    assert [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert (x["train_loss"], x["val_top1"], x["ema_top1"]) == (y["train_loss"], y["val_top1"], y["ema_top1"])


def test_compiled_training_matches_eager_and_resumes_bitwise(data4, tmp_path):
    # aot_eager traces the step as inductor does (dynamo, autograd's joint graph, the partitioner)
    # without generating code, so the test takes seconds; checkpoints hold the bare model's keys.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    recipe = dict(mixup=0.8, cutmix=1.0, drop_path=0.1, model_ema=True, model_ema_decay=0.9, model_ema_decay_batch=0)
    compiled = dict(recipe, compile=True, compile_backend="aot_eager")
    fit(_config(data4, tmp_path / "eager", **recipe))
    assert not counters["stats"]["unique_graphs"]
    fit(_config(data4, tmp_path / "compiled", **compiled))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the step is one graph
    for x, y in zip(_rows(tmp_path / "eager"), _rows(tmp_path / "compiled"), strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)

    out = tmp_path / "resumed"
    assert fit(_config(data4, out, **compiled), on_step=_stop_at({2}))["status"] == "interrupted"
    assert fit(_config(data4, out, resume="auto", **compiled))["status"] == "finished"
    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (tmp_path / "compiled", out))
    assert a["model"].keys() == mlla.create_model("test_mlla", num_classes=4).state_dict().keys()
    for part in ("model", "model_ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    assert [r["train_loss"] for r in _rows(tmp_path / "compiled")] == [r["train_loss"] for r in _rows(out)]


def test_attention_backend_setting_chooses_the_kernel_for_training_and_evaluation(data4, tmp_path, monkeypatch):
    # Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest).
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1 set before Triton is imported")
    import mlla.ops.mlla_attn as attention

    launches, fused = [], attention.fused_attention
    monkeypatch.setattr(attention, "fused_attention", lambda: launches.append(attention.get_attention_backend()) or fused())
    runs = {}
    for backend in ("torch", "triton"):
        runs[backend] = fit(_config(data4, tmp_path / backend, epochs=1, model_ema=False, attention_backend=backend))
        assert attention.get_attention_backend() == "auto"  # the process's setting is restored after the run
    # Not given, the run keeps the process's setting (a script's set_attention_backend).
    seen = []
    with attention.attention_backend("torch"):
        fit(_config(data4, tmp_path / "kept", epochs=1, model_ema=False), on_step=lambda step: seen.append(attention.get_attention_backend()))
    assert seen == ["torch"] * 4
    layers = sum(isinstance(m, MllaLinearAttention) for m in mlla.create_model("test_mlla").modules())
    # Every attention call of the triton run, none of the torch run: 4 training steps and 2 validation batches.
    assert launches == ["triton"] * layers * (4 + 2)
    # Compiled with the kernel: one graph with the kernel as a custom op, no break, no recompilation.
    from torch._dynamo.utils import counters

    monkeypatch.setattr(attention, "fused_attention", fused)  # the counting one would be traced

    torch._dynamo.reset()
    counters.clear()
    fit(_config(data4, tmp_path / "compiled", epochs=1, model_ema=False, attention_backend="triton", compile=True,
                compile_backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for run in ("triton", "compiled"):
        for x, y in zip(_rows(tmp_path / "torch"), _rows(tmp_path / run), strict=True):
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data4, tmp_path, monkeypatch):
    made = []

    def create_model(*args, **kwargs):
        made.append(mlla.create_model(*args, **kwargs))
        return made[-1]

    def poison(step: int) -> None:
        if step == 6:  # in epoch 2, after last.pth of epoch 1 was written
            with torch.no_grad():
                made[-1].head.fc.bias.fill_(float("nan"))

    monkeypatch.setattr(classification_module, "create_model", create_model)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"loss became nan at epoch 2.*last good checkpoint is .*last\.pth"):
        fit(_config(data4, out, model_ema=False), on_step=poison)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len(_rows(out)) == 1


def test_corrupt_images_are_counted_in_the_epoch_summary(tmp_path, caplog):
    data = make_demo_dataset(tmp_path / "data", 4, 2, classes=DEMO_CLASSES[:2], progress=False)
    for p in sorted((data / "train").rglob("*.png"))[:2] + sorted((data / "val").rglob("*.png"))[:1]:
        p.write_bytes(b"\x89PNG but broken")
    with caplog.at_level("INFO"):
        fit(_config(data, tmp_path / "run", epochs=1, model_ema=False, max_failed_fraction=0.5))
    row = _rows(tmp_path / "run")[0]
    assert row["train_skipped"] == 2 and row["val_skipped"] == 1
    assert any("3 failed samples skipped" in r.message for r in caplog.records)


def test_resume_on_data_with_other_classes_is_refused(data4, tmp_path):
    out = tmp_path / "run"
    fit(_config(data4, out, epochs=1, model_ema=False))
    other = make_demo_dataset(tmp_path / "other", 4, 1, classes=DEMO_CLASSES[:5], progress=False)
    with pytest.raises(mlla.CheckpointError, match="trained on 4 classes.*has 5"):
        fit(_config(other, out, epochs=2, resume="auto", model_ema=False))


def test_existing_run_needs_resume_and_missing_val_split_only_warns(data4, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _config(data4, out, epochs=1, model_ema=False, val_split="nope")
    with caplog.at_level("WARNING"):
        summary = fit(cfg)
    assert any("training without validation" in r.message for r in caplog.records)
    assert "val_top1" not in summary["last"] and (out / "best.pth").is_file()
    with pytest.raises(ValueError, match="already holds a run.*--resume auto"):
        fit(cfg)


def test_cli_train_exits_cleanly_on_sigterm(data4, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlla.cli", "train", "--model", "test_mlla", "--data-dir", str(data4),
           "--output", str(out), "--epochs", "1000", "-b", "4", "--img-size", "32", "-j", "0",
           "--no-amp", "--no-progress", "--save-every-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pth").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "--resume auto" in err
    assert torch.load(out / "last.pth", weights_only=True)["global_step"] >= 1


def test_step_and_poly_schedules_follow_the_recipes(data4):
    from mlla.engine.schedule import build_scheduler

    def lrs(**kw):
        cfg = ClassificationConfig(model="test_mlla", epochs=12, lr=1e-4, lr_base=1e-4, warmup_lr_base=1e-7, min_lr_base=0.0, **kw)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        scheduler, warmup = build_scheduler(opt, cfg, steps_per_epoch=10, warmup_lr=1e-7, min_lr=0.0)
        out = []
        for step in range(120):
            scheduler.step_update(step)
            out.append(opt.param_groups[0]["lr"])
        return out, warmup

    step, warmup = lrs(sched="step", decay_milestones=(8, 11), warmup_steps=5)
    assert warmup == 5 and step[0] < 1e-5 and step[5] == pytest.approx(1e-4)
    assert step[79] == pytest.approx(1e-4) and step[80] == pytest.approx(1e-5) and step[110] == pytest.approx(1e-6)
    poly, _ = lrs(sched="poly", poly_power=1.0, warmup_steps=0)
    assert poly[0] == pytest.approx(1e-4) and poly[60] == pytest.approx(0.5e-4, rel=0.02)
    assert all(a >= b for a, b in zip(poly, poly[1:]))
    with pytest.raises(ValueError, match="unknown --sched 'linear'"):
        lrs(sched="linear")


class _MeanColourTask(mlla.engine.Task):
    """A task of another kind than classification: regress each image's mean colour."""

    name, best_metric, best_metric_label = "mean-colour", "neg_mse", "-MSE"

    def build_datasets(self, data_dir, env):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(24, 3, 16, 16, generator=g)
        data = [(x, x.mean(dim=(1, 2))) for x in images]
        return data[:16], data[16:]

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), 0

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))

    def training_loss(self, model, inputs, targets, *, ema, epoch):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        return loss, dict(mse=loss.item())

    def evaluate(self, model, loader, env, *, autocast, progress, desc):
        with torch.no_grad():
            errors = [torch.nn.functional.mse_loss(model(x), y).item() for x, y, _ in loader]
        return dict(neg_mse=-sum(errors) / len(errors))


def test_a_new_task_plugs_into_the_one_engine(tmp_path):
    out = tmp_path / "run"
    cfg = ClassificationConfig(model="custom", data_dir=str(tmp_path), output=str(out), epochs=3, batch_size=4, workers=0,
                      progress=False, amp=False, lr=1e-2, warmup_epochs=0, model_ema=True, model_ema_decay=0.5,
                      model_ema_decay_batch=0, sched="step", decay_milestones=(2,))
    summary = fit(cfg, task=_MeanColourTask(cfg))
    rows = _rows(out)
    assert summary["status"] == "finished" and [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_mse", "val_neg_mse", "ema_neg_mse"} <= set(rows[0])
    assert rows[-1]["val_neg_mse"] > rows[0]["val_neg_mse"]
    assert summary["best"]["score"] == max(max(r["val_neg_mse"], r["ema_neg_mse"]) for r in rows)
    assert "val_neg_mse" in (out / "metrics.csv").read_text().splitlines()[0]
    assert (out / "metrics.png").is_file() and (out / "best.pth").is_file()


def test_amp_bf16_training_runs_in_bf16_with_finite_fp32_gradients(data4, tmp_path, monkeypatch):
    from mlla.engine.trainer import Trainer

    trainer = Trainer(_config(data4, tmp_path / "probe", amp=True, model_ema=False))
    assert trainer.amp_dtype == torch.bfloat16  # CPU: bf16 autocast
    model = trainer.model
    linear_dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, o: linear_dtypes.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    with trainer.autocast():
        logits = model(x)
    for h in hooks:
        h.remove()
    assert logits.dtype == torch.bfloat16 and linear_dtypes == {torch.bfloat16}
    with torch.no_grad():
        reference = model(x)
    assert (logits.float() - reference).norm() / reference.norm() < 0.05  # bf16 rounding, not another computation
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params) and any(p.grad.abs().sum() > 0 for p in params)

    made, head_dtypes = [], set()

    def create_model(*args, **kwargs):  # watch the training loop's own forward passes
        made.append(mlla.create_model(*args, **kwargs))
        made[-1].head.fc.register_forward_hook(lambda m, i, o: head_dtypes.add(o.dtype) if m.training else None)
        return made[-1]

    monkeypatch.setattr(classification_module, "create_model", create_model)
    out = tmp_path / "run"
    summary = fit(_config(data4, out, amp=True, epochs=1, model_ema=False))
    assert summary["status"] == "finished" and head_dtypes == {torch.bfloat16}
    row = _rows(out)[0]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("train_loss", "val_loss"))
    saved, trained = torch.load(out / "last.pth", weights_only=True)["model"], made[-1].state_dict()
    for k, v in saved.items():  # the fp32 master weights, finite, were saved
        assert v.dtype == trained[k].dtype and torch.equal(v, trained[k]), k
        assert not v.is_floating_point() or (v.dtype == torch.float32 and torch.isfinite(v).all()), k


@pytest.mark.slow  # two training processes: ~45 s on 2 busy cores
def test_cli_train_sigint_saves_exits_0_and_resumes(data4, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlla.cli", "train", "--model", "test_mlla", "--data-dir", str(data4),
           "--output", str(out), "--epochs", "1000", "-b", "4", "--img-size", "32", "-j", "0",
           "--no-amp", "--no-progress", "--save-every-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run_until(past_step: int, *extra: str) -> tuple[int, str]:
        proc = subprocess.Popen(cmd + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if (out / "last.pth").is_file() and torch.load(out / "last.pth", weights_only=True)["global_step"] > past_step:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()[1]
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        return proc.returncode, err

    rc, err = run_until(0)
    assert rc == 0, err
    assert "SIGINT received" in err and "--resume auto" in err
    first = torch.load(out / "last.pth", weights_only=True)["global_step"]
    rc, err = run_until(first, "--resume", "auto")
    assert rc == 0, err
    assert "resumed from" in err and "SIGINT received" in err
    assert torch.load(out / "last.pth", weights_only=True)["global_step"] > first
