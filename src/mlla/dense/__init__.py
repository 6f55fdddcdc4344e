"""Dense prediction on MLLA backbones: UperNet segmentation (ADE20K layout)."""
from .segmentation import AUX_LOSS_WEIGHT, UperNet, upernet

__all__ = ["AUX_LOSS_WEIGHT", "UperNet", "upernet"]
