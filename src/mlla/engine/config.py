"""The settings every training run shares, and the one resolver of a task's settings.

:class:`TrainConfig` holds what the engine itself uses (model and data location, processes,
optimizer, schedule, EMA, AMP, checkpoints, logging). Each task extends it with a dataclass of
its own (:attr:`mlla.engine.task.Task.settings`) and declares its presets; a run's settings are
resolved as defaults < preset < YAML file < command-line flags (:func:`resolve_config`) and saved
with the run. Each field's ``metadata`` carries its help text and flag group, from which
:mod:`mlla.engine.flags` writes the command-line flags.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..checkpoint import atomic_save
from ..ops.mlla_attn.backend import BACKENDS as ATTENTION_BACKENDS

__all__ = ["COMPILE_MODES", "TrainConfig", "load_yaml", "parse_kwargs", "resolve_config", "save_yaml", "setting"]

_logger = logging.getLogger(__name__)


def setting(default: Any = None, help: str = "", *, group: str, factory: Any = None, **flag: Any) -> Any:
    """A settings field: its default (``factory`` for a mutable one), help text, flag group, and
    extra :meth:`argparse.ArgumentParser.add_argument` options (``short``, ``choices``; ``flag=False``: no flag)."""
    metadata = dict(help=help, group=group, **flag)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: ``torch.compile``'s modes (``--compile-mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_RUN, _MODEL, _DATA, _OPT, _EMA = "run", "model", "data", "optimizer and schedule (learning rates at a total batch of --lr-base-size)", "model EMA"


@dataclass
class TrainConfig:
    """The settings shared by every task's run. Learning rates are given at a total batch of
    ``lr_base_size`` and scaled linearly with the actual total batch (``lr`` overrides)."""

    task: str = setting("task", "the task these settings are for (set by each task's settings class)", group=_RUN, flag=False)
    # model
    model: str | None = setting(None, "registered model name (see `mlla models`)", group=_MODEL)
    model_kwargs: dict[str, Any] = setting(help="extra model arguments, e.g. embed_dim=32 depths=1,2,2,1", group=_MODEL, factory=dict)
    num_classes: int | None = setting(None, "check the data has this many classes (default: as many as it has)", group=_MODEL)
    drop_path: float | None = setting(None, "stochastic depth rate (default: the model's)", group=_MODEL)
    initial_checkpoint: str | None = setting(None, "start from these weights (a training checkpoint gives its raw weights)", group=_MODEL)
    channels_last: bool = setting(False, "channels-last input memory format", group=_MODEL)
    compile: bool = setting(False, "run the training step's model through torch.compile (the first steps take minutes "
                            "to compile; evaluation stays eager)", group=_MODEL)
    compile_mode: str = setting("default", "torch.compile mode with --compile; reduce-overhead replays CUDA graphs (GPU only)",
                                group=_MODEL, choices=COMPILE_MODES)
    compile_backend: str = setting("inductor", "torch.compile backend with --compile (aot_eager: no code generation, for debugging)",
                                   group=_MODEL)
    attention_backend: str | None = setting(None, "how MLLA's attention runs, in training and evaluation: auto (the fused "
                                            "Triton kernel on CUDA in eager mode, the PyTorch form under --compile and on "
                                            "CPUs), torch, or triton (the kernel, under --compile too; CUDA only) (default: "
                                            "the process's setting, mlla.ops.set_attention_backend, auto unless a script set "
                                            "another)", group=_MODEL, choices=ATTENTION_BACKENDS)
    sync_bn: bool = setting(False, "BatchNorm statistics over all processes", group=_MODEL)
    # data
    data_dir: str | None = setting(None, "dataset root (default: generate the task's demo data in OUTPUT/demo_data)", group=_DATA)
    train_split: str = setting("train", "training split folder", group=_DATA)
    val_split: str = setting("val", "validation split folder", group=_DATA)
    workers: int | None = setting(None, "data loading processes per training process (default: up to 4, no more than the cores)",
                                  group=_DATA, short="-j")
    max_failed_fraction: float = setting(0.01, "stop when more than this fraction of an epoch's samples (summed over all "
                                         "processes) fail to load or transform; failed samples are skipped and logged",
                                         group=_DATA)
    # run
    output: str | None = setting(None, "run folder: config.yaml, last.pth, best.pth, metrics.* (default: under runs/, named after the model)", group=_RUN)
    resume: str | None = setting(None, "'auto' (OUTPUT/last.pth if there; says what it found) or a checkpoint path", group=_RUN)
    seed: int = setting(0, "random seed", group=_RUN)
    device: str = setting("auto", "auto, cpu, cuda", group=_RUN)
    epochs: int = setting(300, "passes over the training data", group=_RUN)
    batch_size: int = setting(128, "images per process and step", group=_RUN, short="-b")
    save_every_steps: int = setting(0, "also save last.pth every N steps (0: at epoch ends only)", group=_RUN)
    progress: bool = setting(True, "progress bars", group=_RUN)
    tensorboard: bool = setting(False, "also log to OUTPUT/tensorboard (needs tensorboard)", group=_RUN)
    # optimizer and schedule
    opt: str = setting("adamw", "timm optimizer name", group=_OPT)
    opt_betas: tuple[float, float] = setting((0.9, 0.999), "optimizer betas", group=_OPT)
    opt_eps: float = setting(1e-8, "optimizer epsilon", group=_OPT)
    weight_decay: float = setting(0.05, "weight decay (not applied to norms and biases)", group=_OPT)
    lr: float | None = setting(None, "absolute peak learning rate (overrides --lr-base scaling)", group=_OPT)
    lr_base: float = setting(5e-4, "peak learning rate at a total batch of --lr-base-size", group=_OPT)
    warmup_lr_base: float = setting(5e-7, "warm-up start rate at a total batch of --lr-base-size", group=_OPT)
    min_lr_base: float = setting(5e-6, "final rate at a total batch of --lr-base-size", group=_OPT)
    lr_base_size: int = setting(512, "the total batch the rates are given for", group=_OPT)
    warmup_epochs: float = setting(20, "warm-up in epochs", group=_OPT)
    warmup_steps: int | None = setting(None, "warm-up in optimizer steps (overrides --warmup-epochs; none: use that)", group=_OPT)
    sched: str = setting("cosine", "decay after the warm-up", group=_OPT, choices=("cosine", "step", "poly"))
    decay_milestones: tuple[float, ...] = setting((), "epochs at which 'step' multiplies the rate by --decay-rate, e.g. 8,11", group=_OPT)
    decay_rate: float = setting(0.1, "factor of each 'step' decay", group=_OPT)
    poly_power: float = setting(1.0, "exponent of the 'poly' decay", group=_OPT)
    clip_grad: float | None = setting(5.0, "gradient norm clip (none: off)", group=_OPT)
    amp: bool = setting(True, "mixed precision", group=_OPT)
    amp_dtype: str = setting("auto", "auto: bfloat16 (float16 on GPUs without bfloat16)", group=_OPT,
                             choices=("auto", "bfloat16", "float16"))
    # model EMA
    model_ema: bool = setting(True, "keep an EMA of the weights (evaluated every epoch)", group=_EMA)
    model_ema_decay: float = setting(0.9996, "EMA decay per step", group=_EMA)
    model_ema_decay_batch: int = setting(4096, "total batch the decay is given for: it is rescaled to decay ** (total "
                                         "batch / this); 0: as is", group=_EMA)

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

    def unused(self) -> set[str]:
        """Settings these values make no use of (left out of ``--print-config``): the warm-up
        epochs when warm-up steps are given, the decay knobs of other schedules, the EMA's without an
        EMA, the compiler's without ``--compile``."""
        unused = set()
        if self.warmup_steps is not None:
            unused.add("warmup_epochs")
        if self.sched != "step":
            unused |= {"decay_milestones", "decay_rate"}
        if self.sched != "poly":
            unused.add("poly_power")
        if not self.model_ema:
            unused |= {"model_ema_decay", "model_ema_decay_batch"}
        if not self.compile:
            unused |= {"compile_mode", "compile_backend"}
        return unused

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _coerce(cls: type[TrainConfig], name: str, value: Any) -> Any:
    f = cls.__dataclass_fields__[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if name == "model_kwargs":
        if not isinstance(value, Mapping):
            raise ValueError(f"model_kwargs must be a mapping, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _check_keys(cls: type[TrainConfig], values: Mapping[str, Any], source: str) -> None:
    fields = cls.__dataclass_fields__
    unknown = [k for k in values if k not in fields]
    if unknown:
        task = fields["task"].default
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, 1)) else k for k in unknown]
        raise ValueError(f"{source}: {', '.join(hints)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} "
                         f"of the {task} task; its settings are the flags of its train command's --help")


#: Keys every settings mapping a run saves holds (its ``config.yaml``, a checkpoint's ``config``),
#: in the flat format of runs saved before each task had its own settings as today.
_SAVED_RUN_KEYS = frozenset((
    "task", "model", "model_kwargs", "num_classes", "drop_path", "initial_checkpoint", "data_dir", "train_split",
    "val_split", "workers", "output", "resume", "seed", "device", "epochs", "batch_size", "opt", "opt_betas",
    "weight_decay", "lr", "lr_base", "warmup_lr_base", "min_lr_base", "lr_base_size", "warmup_epochs", "clip_grad",
    "amp", "model_ema", "model_ema_decay",
))


def _from_saved_run(cls: type[TrainConfig], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A run saved before each task had its own settings wrote every task's settings in one flat
    mapping: keep the ones ``cls`` has (a mapping holding all :data:`_SAVED_RUN_KEYS` was saved by a run)."""
    if not _SAVED_RUN_KEYS <= set(values):
        return values
    other = sorted(k for k in values if k not in cls.__dataclass_fields__)
    if other:
        _logger.debug("%s: an older run's settings; %d that the %s task does not use are left out: %s",
                      source, len(other), cls.__dataclass_fields__["task"].default, ", ".join(other))
    return {k: v for k, v in values.items() if k in cls.__dataclass_fields__}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read settings from a YAML mapping (keys as the fields of a task's settings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Atomically write ``cfg`` as YAML, loadable again with ``--config``."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)


def resolve_config(
    cls: type[TrainConfig],
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """``cls``'s defaults, then preset ``preset`` of ``presets``, then the YAML file, then
    ``overrides`` (later wins; ``model_kwargs`` are merged). A saved run's settings (``config.yaml``
    or a checkpoint's ``config``) load as ``overrides`` or the YAML file, in today's form or the
    flat one of older runs."""
    task = cls.__dataclass_fields__["task"].default
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if preset:
        presets = presets or {}
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} of the {task} task; choose one of {', '.join(presets) or 'none'}")
        layers.append((f"preset {preset}", presets[preset]))
    if yaml_path:
        layers.append((str(yaml_path), load_yaml(yaml_path)))
    if overrides:
        layers.append(("settings", overrides))
    values: dict[str, Any] = {}
    for source, layer in layers:
        layer = _from_saved_run(cls, dict(layer), source)
        _check_keys(cls, layer, source)
        if layer.get("task", task) != task:
            raise ValueError(f"{source} holds settings of the {layer['task']} task, not of the {task} task; "
                             f"give it to that task's command")
        if "model_kwargs" in layer and "model_kwargs" in values:
            layer["model_kwargs"] = dict(values["model_kwargs"], **layer["model_kwargs"])
        values.update(layer)
    values.pop("task", None)
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


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
