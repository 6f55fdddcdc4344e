"""Training configuration: presets (SPEC section 4), YAML, flags, and their precedence."""
from __future__ import annotations

import json

import pytest
import yaml

from mlla.cli import build_parser, main
from mlla.engine import load_yaml, parse_kwargs, save_yaml
from mlla.engine.flags import settings_from_args
from mlla.tasks import ClassificationTask
from mlla.tasks.classification.settings import PRESETS, ClassificationConfig

resolve_config = ClassificationTask.resolve_settings
TrainConfig = ClassificationConfig


def _cfg(*argv: str) -> ClassificationConfig:
    return settings_from_args(ClassificationTask, build_parser().parse_args(["train", *argv]))


def test_recipe_presets_follow_the_paper():
    for name, drop_path, mesa in (("mlla_tiny", 0.2, 1.0), ("mlla_small", 0.3, 1.5), ("mlla_base", 0.5, 2.0)):
        cfg = resolve_config(name)
        assert (cfg.model, cfg.drop_path, cfg.mesa) == (name, drop_path, mesa)
        assert cfg.epochs == 300 and cfg.warmup_epochs == 20 and cfg.weight_decay == 0.05
        assert cfg.scaled_lrs(4096) == pytest.approx((4e-3, 4e-6, 4e-5))
        assert cfg.ema_decay(4096) == pytest.approx(0.9996)
        assert cfg.ema_decay(1024) == pytest.approx(0.9996 ** 0.25)
        assert (cfg.aa, cfg.reprob, cfg.mixup, cfg.cutmix, cfg.smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert {"finetune", "demo"} <= set(PRESETS)


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"epochs": 7, "lr_base": 1e-3, "model_kwargs": {"depths": [1, 1, 1, 1]}}))
    cfg = _cfg("--preset", "mlla_small", "--config", str(tmp_path / "c.yaml"), "--lr-base", "2e-3", "--no-amp")
    assert (cfg.model, cfg.mesa, cfg.epochs, cfg.lr_base, cfg.amp) == ("mlla_small", 1.5, 7, 2e-3, False)
    assert cfg.model_kwargs == {"depths": (1, 1, 1, 1)}
    assert cfg.batch_size == TrainConfig().batch_size == 128


def test_the_models_own_preset_and_the_demo_are_picked_automatically():
    assert _cfg("--model", "mlla_base", "--data-dir", "x").mesa == 2.0
    assert _cfg("--model", "test_mlla", "--data-dir", "x").mesa == TrainConfig().mesa
    demo = _cfg()
    assert demo.model == PRESETS["demo"]["model"] and demo.data_dir is None
    # --model-kwargs are merged over the preset's (here the demo's num_heads stay)
    assert _cfg("--model-kwargs", "embed_dim=8", "depths=1,1,1,1").model_kwargs == {
        "embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}


def test_saved_config_loads_back_to_the_same_settings(tmp_path):
    cfg = _cfg("--preset", "demo", "--epochs", "3", "--scale", "0.5,1")
    save_yaml(cfg, tmp_path / "config.yaml")
    assert resolve_config(yaml_path=tmp_path / "config.yaml") == cfg


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("epohcs: 3\n")
    with pytest.raises(ValueError, match="epohcs \\(did you mean epochs\\?\\) is not a setting of the classification task"):
        resolve_config(yaml_path=tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_kwargs(["embed_dim"])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("mlla_huge")
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["train", "--preset", "mlla_tiny", "--epochs", "5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 5 and printed["model"] == "mlla_tiny" and printed["mesa"] == 1.0
