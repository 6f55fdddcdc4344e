"""Training and evaluation engine: the shared run settings and their resolution, flags written
from a task's settings, one training loop for every task (DDP, AMP, EMA, checkpoints and
resuming, metrics and plots); tasks plug in through :class:`Task` (they live in :mod:`mlla.tasks`)."""
from .config import TrainConfig, load_yaml, parse_kwargs, resolve_config, save_yaml, setting
from .task import Task
from .trainer import Trainer, fit

__all__ = [
    "Task",
    "TrainConfig",
    "Trainer",
    "fit",
    "load_yaml",
    "parse_kwargs",
    "resolve_config",
    "save_yaml",
    "setting",
]
