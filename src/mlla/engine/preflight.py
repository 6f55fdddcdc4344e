"""Checks of a training configuration before any work starts (no run folder, no data generated).

:func:`check_settings` refuses settings that cannot work, each refusal saying what was wrong and
what to do, and warns, with the fix, about settings that would make training ineffective.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from ..data import available_cores, default_workers
from ..layers.attention import follows_attention_backend
from ..models import create_model
from ..ops.mlla_attn.backend import check_backend
from .config import TrainConfig
from .task import Task

__all__ = ["SettingsError", "check_attention_backend_applies", "check_output", "check_schedule", "check_settings"]

_logger = logging.getLogger(__name__)

#: Warn when the scaled peak learning rate is below this fraction of ``lr_base`` (the recipe's
#: value at its total batch): 1/8 is a total batch of 64 against the recipe's 512.
_LOW_LR_FRACTION = 1 / 8


class SettingsError(ValueError):
    """A training setting that cannot work."""


def _positive_int(cfg: TrainConfig, name: str, flag: str, hint: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"{flag} must be a whole number of at least 1, got {value!r}; {hint}")


def _positive_float(value: object, flag: str, hint: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"{flag} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}; {hint}")


def check_output(output: Path) -> None:
    """Raise :class:`SettingsError` unless ``output`` is (or can be made) a writable folder."""
    if output.exists() and not output.is_dir():
        raise SettingsError(f"--output {output} is an existing file, not a folder; give a folder path (e.g. runs/NAME)")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"--output {output}: {existing} is a file, so no folder can be made under it; choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"--output {output}: {existing} is not writable by this user; choose a folder you can write to")


def _ineffective(cfg: TrainConfig, world_size: int) -> list[str]:
    """Warnings about settings that run but train badly."""
    warnings = []
    if cfg.warmup_steps is None and cfg.warmup_epochs >= cfg.epochs:
        warnings.append(
            f"--warmup-epochs {cfg.warmup_epochs:g} covers the whole run of {cfg.epochs} epochs: the learning rate never "
            f"reaches its peak and never decays. Use --warmup-epochs {max(cfg.epochs / 10, 0):g} (a tenth of the run) "
            f"or fewer, or a preset made for short runs (--preset finetune)"
        )
    total_batch = cfg.batch_size * world_size
    if cfg.lr is None:
        lr, _, _ = cfg.scaled_lrs(total_batch)
        if lr < _LOW_LR_FRACTION * cfg.lr_base:
            warnings.append(
                f"the peak learning rate is {lr:.2g}: --lr-base {cfg.lr_base:g} is given for a total batch of "
                f"{cfg.lr_base_size} and scaled down to your total batch of {total_batch}, which is too small to learn "
                f"much. Give the rate itself (e.g. --lr {cfg.lr_base:g}) or --lr-base-size {total_batch}"
            )
    cores = available_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.workers is not None and cfg.workers * local > cores:
        warnings.append(
            f"--workers {cfg.workers} loader processes x {local} training process(es) is more than the {cores} CPU cores: "
            f"they compete and slow loading down. Use -j {default_workers()} (or leave -j out for that default)"
        )
    return warnings


def _check_compile(cfg: TrainConfig, task: Task | None, device: torch.device | None) -> None:
    defaults = TrainConfig.__dataclass_fields__
    if not cfg.compile:
        given = [f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in ("compile_mode", "compile_backend")
                 if getattr(cfg, name) != defaults[name].default]
        if given:
            raise SettingsError(f"{' and '.join(given)} only apply with --compile; add --compile or leave them out")
        return
    if task is not None and task.compile_unsupported:
        raise SettingsError(f"--compile does not apply to the {task.name} task: {task.compile_unsupported}; leave it out")
    if cfg.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        raise SettingsError(f"--compile-backend {cfg.compile_backend!r} is not a torch.compile backend; use inductor "
                            f"(generates code), aot_eager (only traces, for debugging) or one of "
                            f"{', '.join(torch.compiler.list_backends())}")
    if cfg.compile_mode != "default" and cfg.compile_backend != "inductor":
        raise SettingsError(f"--compile-mode {cfg.compile_mode} is a mode of the inductor backend, not of "
                            f"{cfg.compile_backend}; use --compile-backend inductor or leave --compile-mode out")
    if cfg.compile_mode == "reduce-overhead" and device is not None and device.type != "cuda":
        raise SettingsError(f"--compile-mode reduce-overhead replays CUDA graphs, which need a GPU, and this run is on "
                            f"{device.type}; leave it out (or use --device cuda)")


def _check_attention_backend(cfg: TrainConfig, device: torch.device | None) -> None:
    if cfg.attention_backend is None:  # the process's setting
        return
    try:
        check_backend(cfg.attention_backend, device.type if device is not None else "cuda", "--attention-backend")
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if cfg.attention_backend == "auto" or not cfg.model:
        return
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != "pretrained"}  # nothing is downloaded here
    try:  # the registered model, without memory (a task whose model_kwargs are not the model's checks once built)
        with torch.device("meta"):
            model = create_model(cfg.model, **kwargs)
    except (ValueError, TypeError, RuntimeError, KeyError):  # an unknown name or other arguments: the task's model building says what is wrong
        return
    check_attention_backend_applies(cfg.attention_backend, model, cfg.model)


def check_attention_backend_applies(backend: str | None, model: torch.nn.Module, name: str) -> None:
    """Raise :class:`SettingsError` where ``--attention-backend`` is ``torch`` or ``triton`` and
    ``model`` (called ``name``) has no MLLA attention, which the setting would not change."""
    if backend in ("torch", "triton") and not follows_attention_backend(model):
        raise SettingsError(f"--attention-backend {backend} applies to models with MLLA's attention "
                            f"(MllaLinearAttention), and {name} has none; leave it out")


def check_settings(
    cfg: TrainConfig,
    world_size: int = 1,
    *,
    output: Path | None = None,
    task: Task | None = None,
    device: torch.device | None = None,
    log: bool = True,
) -> list[str]:
    """Check ``cfg`` before any work: raise :class:`SettingsError` (a ValueError) for settings that
    cannot work; return (and with ``log`` log) warnings, each with its fix.

    ``output`` is the run folder (``--output``); ``task`` (a :class:`~mlla.engine.task.Task`)
    adds its own checks of its settings and data (:meth:`~mlla.engine.task.Task.check_settings`);
    ``device`` is where the run will train (None: not known yet, so settings that need a GPU are not checked).
    """
    _positive_int(cfg, "epochs", "--epochs", "give the number of passes over the training data, e.g. --epochs 30")
    _positive_int(cfg, "batch_size", "--batch-size", "give the images per process and step, e.g. -b 64")
    if cfg.lr is not None:
        _positive_float(cfg.lr, "--lr", "e.g. --lr 5e-4, or leave it out to scale --lr-base with the batch")
    _positive_float(cfg.lr_base, "--lr-base", "the recipe's is 5e-4")
    _positive_float(cfg.warmup_lr_base, "--warmup-lr-base", "the recipe's is 5e-7", allow_zero=True)
    _positive_float(cfg.min_lr_base, "--min-lr-base", "the recipe's is 5e-6", allow_zero=True)
    _positive_float(cfg.warmup_epochs, "--warmup-epochs", "0 turns warm-up off", allow_zero=True)
    _positive_int(cfg, "lr_base_size", "--lr-base-size", "the total batch --lr-base is given for (the recipe's is 512)")
    if cfg.workers is not None and (isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0):
        raise SettingsError(f"--workers must be 0 (load in the training process) or more, got {cfg.workers!r}")
    fraction = cfg.max_failed_fraction
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise SettingsError(
            f"--max-failed-fraction must lie in [0, 1], got {fraction!r}; e.g. 0.01 stops a run when more than 1% of "
            f"an epoch's samples fail"
        )
    _check_compile(cfg, task, device)
    _check_attention_backend(cfg, device)
    if output is not None:
        check_output(output)
    warnings = task.check_settings() if task is not None else []
    warnings += _ineffective(cfg, world_size)
    if log:
        for w in warnings:
            _logger.warning(w)
    return warnings


def check_schedule(cfg: TrainConfig, total_batch: int, steps_per_epoch: int, *, log: bool = True) -> list[str]:
    """Warnings, with the fix, about the schedule once the number of steps is known: warm-up
    steps covering the run, an EMA that averages over far more steps than the run has."""
    total = cfg.epochs * steps_per_epoch
    warnings = []
    if cfg.warmup_steps is not None and cfg.warmup_steps >= total:
        warnings.append(
            f"--warmup-steps {cfg.warmup_steps} covers the whole run of {total} steps: the learning rate never reaches "
            f"its peak. Use --warmup-steps {max(total // 10, 1)} (a tenth of the run) or fewer"
        )
    if cfg.model_ema:
        decay = cfg.ema_decay(total_batch)
        horizon = 1 / max(1 - decay, 1e-12)  # steps the EMA averages over
        if horizon > total:
            suggested = 1 - 10 / max(total, 20)
            warnings.append(
                f"the EMA decay {decay:.6f} averages over ~{horizon:,.0f} steps but the run has {total}: the EMA weights "
                f"stay close to the initial ones and its accuracy means nothing. For a short run use "
                f"--model-ema-decay {suggested:.3f} --model-ema-decay-batch 0 (or --no-model-ema)"
            )
    if log:
        for w in warnings:
            _logger.warning(w)
    return warnings
