"""What a training run computes, apart from how it runs.

The :class:`~mlla.engine.trainer.Trainer` owns everything that is the same for every task:
processes (DDP), mixed precision, the optimizer and learning-rate schedule, the EMA model,
checkpoints and resuming, signals, the non-finite-loss guard, progress bars, metrics and plots.
A :class:`Task` owns the rest: its settings (a :class:`~mlla.engine.config.TrainConfig`
subclass) and presets, its data and its checks, its model, the loss of a batch, its evaluation,
and rebuilding its model from a run's checkpoint. The tasks live above the engine
(:mod:`mlla.tasks`); the engine knows them only through this class.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import CheckpointError, read_checkpoint
from .config import TrainConfig, resolve_config
from .distributed import DistEnv

__all__ = ["Task"]


class Task:
    """The task-specific half of a training run.

    Batches are ``(inputs, targets, n_skipped)`` triples made by :meth:`collate`: ``n_skipped``
    counts the samples of the batch that could not be loaded or transformed (the trainer sums and
    reports them). Subclasses set :attr:`name`, :attr:`settings`, :attr:`presets`,
    :attr:`best_metric` and :attr:`evaluator`, and implement the methods that raise
    ``NotImplementedError`` (docs/architecture.md: how to add a task).
    """

    #: Short name (``settings.task``).
    name: ClassVar[str] = "task"
    #: The task's settings: the shared run settings and its own.
    settings: ClassVar[type[TrainConfig]] = TrainConfig
    #: Recipe presets: name -> settings (a YAML file and flags are applied over them).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Keys of :meth:`state` that a checkpoint of this task must hold to rebuild its model (and
    #: that must match the data to resume), and what they list, for messages.
    state_keys: ClassVar[tuple[str, ...]] = ()
    label_kind: ClassVar[str] = "classes"
    #: ``evaluator(model, loader, *, env, autocast, progress, desc, **evaluate_options())`` -> metrics.
    evaluator: ClassVar[Callable[..., dict[str, float]] | None] = None
    #: Key of :meth:`evaluate`'s result that selects ``best.pth`` (higher is better).
    best_metric: str = ""
    #: Axis label of :attr:`best_metric` in ``metrics.png``.
    best_metric_label: str = ""
    #: Passed to ``DistributedDataParallel`` (models whose heads skip parameters on some batches).
    find_unused_parameters: bool = False
    #: Why this task's model cannot run through ``torch.compile`` (``--compile`` is refused with
    #: it); empty when it can.
    compile_unsupported: ClassVar[str] = ""

    _by_settings: ClassVar[dict[type[TrainConfig], type["Task"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "settings" in cls.__dict__:
            Task._by_settings[cls.settings] = cls

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @classmethod
    def for_settings(cls, cfg: TrainConfig) -> "Task":
        """The task whose :attr:`settings` class ``cfg`` is an instance of."""
        for kind in type(cfg).__mro__:
            if kind in Task._by_settings:
                return Task._by_settings[kind](cfg)
        raise ValueError(f"no task declares {type(cfg).__name__} as its settings; pass the task to fit()")

    # -- settings
    @staticmethod
    def default_preset(given: Mapping[str, Any]) -> str | None:
        """The preset used when neither ``--preset`` nor ``--config`` is given (``given``: the flags)."""
        return None

    @classmethod
    def resolve_settings(
        cls, preset: str | None = None, yaml_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """The task's settings: defaults < ``preset`` < YAML file < ``overrides`` (a saved run's
        settings load as the YAML file or as ``overrides``, also those of older runs)."""
        return resolve_config(cls.settings, cls.presets, preset, yaml_path, overrides)

    def check_settings(self) -> list[str]:
        """Before any work: raise :class:`ValueError` for settings or data that cannot work for this
        task, return warnings (each with its fix) for ones that would train badly."""
        return []

    # -- data
    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        """Generate the task's built-in demo data in ``root`` (used without ``--data-dir``)."""
        raise NotImplementedError(f"the {self.name} task has no built-in demo data: give --data-dir")

    def build_datasets(self, data_dir: Path, env: DistEnv) -> tuple[Dataset, Dataset | None]:
        """The training set and the validation set (None to train without validation)."""
        raise NotImplementedError

    def build_eval_dataset(self, data_dir: Path, split: str) -> Dataset:
        """Split ``split`` of ``data_dir`` for evaluation (by ``eval`` commands, after :meth:`restore`)."""
        raise NotImplementedError(f"the {self.name} task has no evaluation command")

    def collate(self, samples: list[Any]) -> tuple[Any, Any, int]:
        """Samples of one batch -> ``(inputs, targets, n_skipped)``."""
        raise NotImplementedError

    # -- model
    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (called after :meth:`build_datasets`)."""
        raise NotImplementedError

    def to_device(self, inputs: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
        """Move a batch to ``device`` (channels-last images when ``cfg.channels_last``)."""
        inputs, targets = _to(inputs, device), _to(targets, device)
        if self.cfg.channels_last and isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets

    def num_images(self, inputs: Any) -> int:
        """Images in a batch's ``inputs`` (for throughput)."""
        return len(inputs)

    # -- optimisation and evaluation
    def training_loss(
        self, model: nn.Module, inputs: Any, targets: Any, *, ema: nn.Module | None, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to minimise (computed under the trainer's autocast) and named parts
        of it to log as ``train_<name>`` (may be empty)."""
        raise NotImplementedError

    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        env: DistEnv,
        *,
        autocast: Callable[[], ContextManager],
        progress: bool,
        desc: str,
    ) -> dict[str, float]:
        """The task's metrics of ``model`` over ``loader``, reduced over all processes: those of
        :attr:`evaluator`, without its ``images`` count.

        Include :attr:`best_metric`; a ``skipped`` entry counts unreadable samples.
        """
        if self.evaluator is None:
            raise NotImplementedError(f"the {self.name} task sets no evaluator")
        metrics = type(self).evaluator(model, loader, env=env, autocast=autocast, progress=progress, desc=desc, **self.evaluate_options())
        metrics.pop("images", None)
        return metrics

    def evaluate_options(self) -> dict[str, Any]:
        """More keyword arguments of :attr:`evaluator`."""
        return {}

    def describe(self, metrics: dict[str, float]) -> str:
        """One line for the epoch log from :meth:`evaluate`'s result."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "skipped")

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        """Plain values saved in every checkpoint (e.g. class names), checked on resume."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` saved (e.g. class names), to rebuild the model without data."""

    def check_resume(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Raise :class:`~mlla.CheckpointError` if ``checkpoint`` (from ``path``) cannot continue on
        this data: its :attr:`state_keys` entries (e.g. the class names) differ from :meth:`state`'s."""
        now = self.state()
        for key in self.state_keys:
            saved = checkpoint.get(key)
            if saved is not None and saved != now[key]:
                raise CheckpointError(
                    f"{path} was trained on {len(saved)} {self.label_kind} but the data has {len(now[key])} (or other "
                    f"names); resume on the same data, or start from it with --initial-checkpoint {path} and a new --output"
                )

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, use_ema: bool = False, weights: bool = True
    ) -> tuple[nn.Module, "Task"]:
        """The model (eval mode, on the CPU) and the task (settings, :meth:`state`) of a run's
        checkpoint (``last.pth`` or ``best.pth``, also of runs saved by older versions); ``use_ema``:
        its EMA weights; ``weights=False``: the model as the run started, built after seeding with
        the run's seed (its untrained twin)."""
        ckpt = read_checkpoint(path)
        saved = ckpt.get("config")
        missing = [k for k in cls.state_keys if k not in ckpt]
        if not isinstance(saved, dict) or saved.get("task", cls.name) != cls.name or missing:
            found = f"settings of a {saved.get('task')} run" if isinstance(saved, dict) else "no run settings"
            raise CheckpointError(f"{path} is not a checkpoint of a {cls.name} run ({found}"
                                  f"{'; no ' + ', '.join(missing) if missing else ''})")
        task = cls(dataclasses.replace(cls.resolve_settings(overrides=saved), initial_checkpoint=None))
        task.restore({k: ckpt[k] for k in cls.state_keys})
        if not weights:
            torch.manual_seed(task.cfg.seed)
            return task.build_model().eval(), task
        model = task.build_model()
        weights = ckpt.get("model_ema") if use_ema else ckpt.get("model")
        if not isinstance(weights, dict):
            raise CheckpointError(f"{path} holds no {'EMA ' if use_ema else ''}weights" + ("; drop --use-ema" if use_ema else ""))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the model its settings describe: {str(e).splitlines()[0]}") from e
        return model.eval(), task


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x
