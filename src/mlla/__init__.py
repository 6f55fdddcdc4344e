"""mlla: Mamba-Like Linear Attention vision models, timm-native.

``import mlla`` registers ``mlla_tiny``, ``mlla_small``, ``mlla_base``, ``test_mlla`` and the
paper's ablation models in timm's registry.
"""
from . import models
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_state_dict
from .models import MLLA, PAPER_RESULTS, checkpoint_filter_fn, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "models",
    "MLLA",
    "PAPER_RESULTS",
    "CheckpointError",
    "checkpoint_filter_fn",
    "create_model",
    "list_models",
    "load_checkpoint",
    "read_checkpoint",
    "save_state_dict",
]
