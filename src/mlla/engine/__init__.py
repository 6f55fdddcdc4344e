"""Training and evaluation engine: configuration and presets, one training loop for every task
(DDP, AMP, EMA, checkpoints and resuming, metrics and plots); tasks plug in through :class:`Task`."""
from .config import TrainConfig, load_yaml, parse_kwargs, resolve_config, save_yaml
from .presets import PRESETS, get_preset
from .task import TASKS, Task, build_task
from .trainer import Trainer, fit

__all__ = [
    "PRESETS",
    "TASKS",
    "Task",
    "build_task",
    "TrainConfig",
    "Trainer",
    "fit",
    "get_preset",
    "load_yaml",
    "parse_kwargs",
    "resolve_config",
    "save_yaml",
]
