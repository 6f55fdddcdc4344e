"""Model families, registered in timm's registry on import."""
from . import ablation
from .mlla import MLLA, MllaStage, checkpoint_filter_fn
from .registry import PAPER_RESULTS, create_model, list_models

__all__ = ["MLLA", "ablation", "MllaStage", "PAPER_RESULTS", "checkpoint_filter_fn", "create_model", "list_models"]
