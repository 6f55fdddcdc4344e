"""Training and evaluation engine: configuration and presets, the training loop (DDP, AMP,
EMA, MESA), checkpoints and resuming, metrics and plots."""
from .config import TrainConfig, load_yaml, parse_kwargs, resolve_config, save_yaml
from .evaluate import evaluate
from .presets import PRESETS, get_preset
from .trainer import Trainer, fit

__all__ = [
    "PRESETS",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "fit",
    "get_preset",
    "load_yaml",
    "parse_kwargs",
    "resolve_config",
    "save_yaml",
]
