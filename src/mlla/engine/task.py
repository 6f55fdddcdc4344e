"""What a training run computes, apart from how it runs.

The :class:`~mlla.engine.trainer.Trainer` owns everything that is the same for every task:
processes (DDP), mixed precision, the optimizer and learning-rate schedule, the EMA model,
checkpoints and resuming, signals, the non-finite-loss guard, progress bars, metrics and plots.
A :class:`Task` owns the rest: its data, its model, the loss of a batch and its evaluation.
Classification (:mod:`mlla.tasks.classification.task`), detection and segmentation
(:mod:`mlla.dense`) are tasks; ``TrainConfig.task`` names the one a run uses.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .distributed import DistEnv

__all__ = ["TASKS", "Task", "build_task"]

#: Task names and where their classes live (imported on first use).
TASKS: dict[str, str] = {
    "classification": "mlla.tasks.classification.task:ClassificationTask",
    "detection": "mlla.tasks.detection.task:DetectionTask",
    "segmentation": "mlla.tasks.segmentation.task:SegmentationTask",
}


class Task:
    """The task-specific half of a training run.

    Batches are ``(inputs, targets, n_skipped)`` triples made by :meth:`collate`: ``n_skipped``
    counts the samples of the batch that could not be loaded or transformed (the trainer sums and
    reports them). Subclasses set :attr:`name` and :attr:`best_metric` and implement the methods
    that raise ``NotImplementedError``.
    """

    #: Short name, as in :data:`TASKS`.
    name: str = "task"
    #: Key of :meth:`evaluate`'s result that selects ``best.pth`` (higher is better).
    best_metric: str = ""
    #: Axis label of :attr:`best_metric` in ``metrics.png``.
    best_metric_label: str = ""
    #: Passed to ``DistributedDataParallel`` (models whose heads skip parameters on some batches).
    find_unused_parameters: bool = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    # -- data
    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        """Generate the task's built-in demo data in ``root`` (used without ``--data-dir``)."""
        raise NotImplementedError(f"the {self.name} task has no built-in demo data: give --data-dir")

    def build_datasets(self, data_dir: Path, env: DistEnv) -> tuple[Dataset, Dataset | None]:
        """The training set and the validation set (None to train without validation)."""
        raise NotImplementedError

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
        """The task's metrics of ``model`` over ``loader``, reduced over all processes.

        Must include :attr:`best_metric`; a ``skipped`` entry counts unreadable samples.
        """
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        """One line for the epoch log from :meth:`evaluate`'s result."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "skipped")

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        """Plain values saved in every checkpoint (e.g. class names), checked on resume."""
        return {}

    def check_resume(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Raise :class:`~mlla.CheckpointError` if ``checkpoint`` (from ``path``) cannot continue on this data."""


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def build_task(cfg: TrainConfig) -> Task:
    """The :class:`Task` named by ``cfg.task``."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    module, _, cls = TASKS[cfg.task].partition(":")
    try:
        task_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the {cfg.task} task is not available ({e})") from e
    return task_cls(cfg)
