"""The training configuration: one flat set of fields (timm's flag names), resolved as
defaults < preset < YAML file < command-line flags, and saved with the run."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..checkpoint import atomic_save
from .presets import get_preset

__all__ = ["TrainConfig", "load_yaml", "parse_kwargs", "resolve_config", "save_yaml"]


@dataclass
class TrainConfig:
    """Every setting of a training run. Learning rates are given at a total batch of
    ``lr_base_size`` and scaled linearly with the actual total batch (``lr`` overrides)."""

    # task and model
    task: str = "classification"  # classification, detection, segmentation (mlla.engine.task.TASKS)
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # None: the number of class folders
    drop_path: float | None = None  # None: the model's default
    initial_checkpoint: str | None = None  # weights to start from (fine-tuning; new head allowed)
    initial_checkpoint_ema: bool = False  # take initial_checkpoint's EMA weights, not its raw ones
    grad_checkpointing: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    # data
    data_dir: str | None = None  # None: the generated demo dataset (mlla.tasks.classification.demo)
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    workers: int | None = None  # loader processes per training process; None: up to 4, within the cores
    max_failed_fraction: float = 0.01  # stop when more of an epoch's samples fail (unreadable, transform error)
    # run
    output: str | None = None
    resume: str | None = None  # 'auto' (output/last.pth if there), or a checkpoint path
    seed: int = 0
    device: str = "auto"
    epochs: int = 300
    batch_size: int = 128  # per process
    save_every_steps: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    progress: bool = True
    tensorboard: bool = False
    # optimizer and schedule
    opt: str = "adamw"
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    weight_decay: float = 0.05
    lr: float | None = None
    lr_base: float = 5e-4
    warmup_lr_base: float = 5e-7
    min_lr_base: float = 5e-6
    lr_base_size: int = 512
    warmup_epochs: float = 20
    warmup_steps: int | None = None  # overrides warmup_epochs
    sched: str = "cosine"  # cosine, step (x decay_rate at each of decay_milestones) or poly
    decay_milestones: tuple[float, ...] = ()  # epochs, for sched 'step'
    decay_rate: float = 0.1
    poly_power: float = 1.0
    clip_grad: float | None = 5.0
    amp: bool = True
    amp_dtype: str = "auto"  # auto: bfloat16 (float16 on GPUs without bfloat16)
    # augmentation and regularisation
    no_aug: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    aa: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # model EMA and MESA
    model_ema: bool = True
    model_ema_decay: float = 0.9996
    model_ema_decay_batch: int = 4096  # decay is rescaled to decay ** (total batch / this); 0: as is
    mesa: float = 0.0  # weight of the soft-target loss against the EMA model's predictions
    mesa_start: float = 0.25  # fraction of the epochs after which MESA is on
    # detection (task 'detection', mlla.dense)
    det_min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))  # shorter side: one sampled per batch; the last in evaluation
    det_max_size: int = 1333  # cap on the longer side
    det_skip_empty: bool = True  # leave training images without annotations out (counted)

    # segmentation (task 'segmentation', mlla.dense): mmseg's ADE20K recipe
    seg_crop_size: int = 512
    seg_scale: tuple[int, int] = (2048, 512)  # (long, short) edge bounds of the keep-ratio resize
    seg_ratio_range: tuple[float, float] = (0.5, 2.0)  # training resize ratios of seg_scale
    seg_cat_max_ratio: float = 0.75  # crops where one class covers more are redrawn (1: off)
    seg_reduce_zero_label: bool = True  # label 0 is unlabelled (ADE20K); labels shift by -1
    seg_channels: int = 512  # UperNet width
    seg_aux_channels: int = 256  # auxiliary FCN head width
    seg_aux_weight: float = 0.4  # auxiliary loss weight (0: no auxiliary head)
    seg_test_mode: str = "whole"  # validation inference: whole or slide
    seg_stride: int = 341  # sliding-window stride (windows of seg_crop_size)

    def scaled_lrs(self, total_batch: int) -> tuple[float, float, float]:
        """``(lr, warmup_lr, min_lr)`` for ``total_batch`` images per optimizer step."""
        scale = total_batch / self.lr_base_size
        if self.lr is not None:
            scale = self.lr / self.lr_base
        return self.lr_base * scale, self.warmup_lr_base * scale, self.min_lr_base * scale

    def run_dir(self) -> Path:
        """The run folder: ``output``, or ``runs/<model>``."""
        return Path(self.output) if self.output else Path("runs") / (self.model or "run")

    def ema_decay(self, total_batch: int) -> float:
        """Per-step EMA decay for ``total_batch`` images per step."""
        if not self.model_ema_decay_batch:
            return self.model_ema_decay
        return self.model_ema_decay ** (total_batch / self.model_ema_decay_batch)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    default = getattr(TrainConfig(), name)
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if name == "model_kwargs":
        if not isinstance(value, Mapping):
            raise ValueError(f"model_kwargs must be a mapping, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    unknown = [k for k in values if k not in _FIELDS]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, _FIELDS, 1)) else k for k in unknown]
        raise ValueError(f"{source}: unknown setting(s) {', '.join(hints)}; see `mlla train --help`")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read training settings from a YAML mapping (keys are :class:`TrainConfig` fields)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    _check_keys(values, str(path))
    return values


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Atomically write ``cfg`` as YAML, loadable again with ``--config``."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)


def resolve_config(
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then ``preset``, then the YAML file, then ``overrides`` (later wins)."""
    values: dict[str, Any] = {}
    if preset:
        values.update(get_preset(preset))
    if yaml_path:
        values.update(load_yaml(yaml_path))
    if overrides:
        _check_keys(overrides, "overrides")
        values.update(overrides)
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``['embed_dim=32', 'depths=1,2,2,1']`` -> ``{'embed_dim': 32, 'depths': (1, 2, 2, 1)}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model argument {item!r} must look like NAME=VALUE, e.g. embed_dim=32 or depths=1,2,2,1")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out
