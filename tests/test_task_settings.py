"""Each task owns its settings, presets, flags and checkpoint loading; runs saved before that
(one flat settings mapping, tests/fixtures/run_before_task_settings) still resume and load.

``RegressionTask`` below is the worked example of docs/architecture.md: a task added without
touching the engine or another task."""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from mlla.cli import build_parser, main
from mlla.commands._task import add_train_command
from mlla.engine import Task, TrainConfig, setting
from mlla.tasks import TASKS, ClassificationTask, DetectionTask, SegmentationTask, register_task

FIXTURES = Path(__file__).parent / "fixtures" / "run_before_task_settings"


# --------------------------------------------------------------------------- a new task
@dataclass
class RegressionConfig(TrainConfig):
    """The shared run settings plus the regression task's own."""

    task: str = setting("regression", group="run", flag=False)
    features: int = setting(4, "input features of the generated data", group="regression")
    noise: float = setting(0.01, "standard deviation of the target noise", group="regression")


def mse(model: nn.Module, loader: Any, *, env: Any, autocast: Any, progress: bool, desc: str) -> dict[str, float]:
    """Mean squared error of ``model`` over ``loader`` (``neg_mse``: higher is better)."""
    errors = [(model(x) - y).pow(2).mean().item() for x, y, _ in loader]
    return dict(neg_mse=-float(np.mean(errors)), skipped=0)


class RegressionTask(Task):
    """Fit y = x . w + noise with a linear layer (features, noise: :class:`RegressionConfig`)."""

    name = "regression"
    settings = RegressionConfig
    presets = {"quick": dict(model="linear", epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, model_ema=False,
                             workers=0, progress=False, amp=False, clip_grad=None)}
    state_keys = ("features",)
    evaluator = staticmethod(mse)
    best_metric = "neg_mse"
    best_metric_label = "-MSE"

    @staticmethod
    def default_preset(given: dict[str, Any]) -> str:
        return "quick"

    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, self.cfg.features, generator=g)
        y = x @ torch.arange(1.0, self.cfg.features + 1)[:, None] + self.cfg.noise * torch.randn(64, 1, generator=g)
        root.mkdir(parents=True, exist_ok=True)
        torch.save(dict(x=x, y=y), root / "data.pt")
        return root

    def build_datasets(self, data_dir: Path, env: Any) -> tuple[TensorDataset, TensorDataset]:
        data = torch.load(data_dir / "data.pt", weights_only=True)
        return TensorDataset(data["x"][:48], data["y"][:48]), TensorDataset(data["x"][48:], data["y"][48:])

    def collate(self, samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), 0

    def build_model(self) -> nn.Module:
        return nn.Linear(self.cfg.features, 1)

    def training_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, ema: Any, epoch: int):
        return (model(inputs) - targets).pow(2).mean(), {}

    def state(self) -> dict[str, Any]:
        return dict(features=self.cfg.features)

    def restore(self, state: dict[str, Any]) -> None:
        assert state["features"] == self.cfg.features


@pytest.fixture
def regression(monkeypatch):
    """RegressionTask registered (only for this test) and its `regress` command."""
    monkeypatch.setitem(TASKS, "regression", RegressionTask)  # taken out again after the test
    register_task(RegressionTask)
    parser = argparse.ArgumentParser(prog="mlla")
    add_train_command(parser.add_subparsers(dest="command"), "regress", RegressionTask, report=lambda summary: None,
                      preset_help="regression preset")
    return parser


def test_a_new_task_gets_flags_presets_and_checkpoint_loading_from_its_own_settings(regression, tmp_path, capsys):
    from mlla.engine.flags import settings_from_args

    args = regression.parse_args(["regress", "--features", "3", "--noise", "0", "--output", str(tmp_path / "run")])
    cfg = settings_from_args(RegressionTask, args)
    assert isinstance(cfg, RegressionConfig) and (cfg.features, cfg.noise, cfg.epochs, cfg.lr) == (3, 0.0, 2, 0.05)
    with pytest.raises(SystemExit):
        regression.parse_args(["regress", "--preset", "demo"])  # only its own presets
    err = capsys.readouterr().err
    assert "invalid choice: 'demo'" in err and "quick" in err
    with pytest.raises(SystemExit):
        regression.parse_args(["regress", "--mixup", "0.2"])
    assert "--mixup does not apply to the regression task (it is a setting of the classification task)" in capsys.readouterr().err

    assert args.func(args) == 0  # trains with the one engine
    assert RegressionTask.resolve_settings(yaml_path=tmp_path / "run" / "config.yaml") == cfg
    model, task = RegressionTask.from_checkpoint(tmp_path / "run" / "last.pth")
    assert isinstance(task, RegressionTask) and task.cfg.features == 3 and model.weight.shape == (1, 3)
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    torch.testing.assert_close(model.state_dict(), saved)
    with pytest.raises(Exception, match="not a checkpoint of a segmentation run"):
        SegmentationTask.from_checkpoint(tmp_path / "run" / "last.pth")


def test_other_tasks_commands_refuse_the_new_tasks_flags(regression, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["seg", "train", "--noise", "0.1"])
    assert "--noise does not apply to the segmentation task (it is a setting of the regression task)" in capsys.readouterr().err


# --------------------------------------------------------------------- the tasks' commands
def test_each_training_command_offers_its_own_presets_and_prints_the_settings_it_uses(capsys):
    parser = build_parser()
    for argv, presets in ((["train"], {"mlla_tiny", "mlla_small", "mlla_base", "finetune", "demo"}),
                          (["det", "train"], {"coco-1x", "coco-3x", "demo"}), (["seg", "train"], {"ade20k-160k", "demo"})):
        sub = parser
        for name in argv:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert set(sub._option_string_actions["--preset"].choices) == presets, argv
    for task in (ClassificationTask, DetectionTask, SegmentationTask):
        for preset in task.presets:  # every preset holds only its task's settings
            assert isinstance(task.resolve_settings(preset), task.settings)
    assert main(["seg", "train", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "segmentation" and printed["seg_crop_size"] == 48 and printed["warmup_steps"] == 50
    for absent in ("img_size", "aa", "mixup", "warmup_epochs", "det_min_sizes", "seg_stride", "decay_rate"):
        assert absent not in printed, absent
    assert main(["det", "train", "--print-config", "--det-max-size", "200"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["det_max_size"] == 200 and printed["decay_milestones"] == [5] and "mixup" not in printed
    with pytest.raises(SystemExit):
        main(["seg", "train", "--preset", "mlla_tiny"])
    assert "invalid choice: 'mlla_tiny'" in capsys.readouterr().err


def test_det_eval_and_seg_eval_take_the_same_arguments():
    parser = build_parser()
    options = {}
    for task in ("det", "seg"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[task]
        ev = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
        options[task] = {s for a in ev._actions for s in a.option_strings}
    shared = {"--checkpoint", "--data-dir", "--split", "--use-ema", "-b", "--batch-size", "-j", "--workers",
              "--max-failed-fraction", "--device", "--amp", "--progress", "--no-progress", "--json"}
    assert shared <= options["det"] and shared <= options["seg"]
    # segmentation adds only its inference options
    assert options["seg"] - options["det"] == {"--multi-scale", "--flip", "--no-flip", "--mode", "--per-class"}


# ------------------------------------------------------------ runs saved by older versions
def _imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / split / c / f"{i}.png")
    return root


def test_a_classification_run_saved_before_resumes(tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "classification", run)
    with gzip.open(run / "last.pth.gz") as src, open(run / "last.pth", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (run / "last.pth.gz").unlink()
    data = _imagefolder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="mlla"):
        assert main(["train", "--config", str(run / "config.yaml"), "--data-dir", str(data), "--output", str(run),
                     "--resume", "auto", "--epochs", "2"]) == 0
    assert f"--resume auto: continuing from {run / 'last.pth'}" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 4  # the saved epoch, then one more
    model, task = ClassificationTask.from_checkpoint(run / "last.pth")
    assert task.class_to_idx == {"a": 0, "b": 1} and task.cfg.img_size == 32 and not hasattr(task.cfg, "seg_crop_size")


def test_segmentation_and_detection_settings_saved_before_load(tmp_path, capsys):
    with gzip.open(FIXTURES / "segmentation" / "best.pth.gz") as src, open(tmp_path / "best.pth", "wb") as dst:
        shutil.copyfileobj(src, dst)
    model, task = SegmentationTask.from_checkpoint(tmp_path / "best.pth")
    assert task.cfg.seg_channels == 4 and task.cfg.seg_crop_size == 48 and task.num_classes > 1
    assert not hasattr(task.cfg, "mixup") and not hasattr(task.cfg, "img_size")
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, task.num_classes, 64, 64)
    assert main(["seg", "train", "--config", str(FIXTURES / "segmentation" / "config.yaml"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["seg_aux_channels"] == 4
    det = DetectionTask.resolve_settings(yaml_path=FIXTURES / "detection" / "config.yaml")
    assert det.det_min_sizes == (128, 144, 160) and det.model_kwargs["fpn_channels"] == 64
    assert main(["train", "--config", str(FIXTURES / "segmentation" / "config.yaml")]) == 2
    assert "holds settings of the segmentation task, not of the classification task" in capsys.readouterr().err


def test_a_hand_written_config_with_another_tasks_setting_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nmixup: 0.2\n")
    with pytest.raises(ValueError, match="mixup is not a setting of the segmentation task"):
        SegmentationTask.resolve_settings(yaml_path=tmp_path / "c.yaml")


def test_resume_auto_says_what_it_found_when_there_is_no_last_checkpoint(tmp_path, caplog):
    from mlla.engine.checkpointing import find_resume

    (tmp_path / "best.pth").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="mlla"):
        assert find_resume("auto", tmp_path) is None
    assert "no " + str(tmp_path / "last.pth") in caplog.text and "found only best.pth" in caplog.text
    assert "starting fresh" in caplog.text
