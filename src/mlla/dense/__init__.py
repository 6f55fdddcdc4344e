"""Dense prediction on MLLA backbones: UperNet semantic segmentation on ADE20K-layout data
(``mlla seg``)."""
from .ade import IGNORE_INDEX, SegmentationDataset, build_seg_transform
from .seg_demo import SEG_DEMO_CLASSES, make_seg_demo_dataset
from .seg_eval import MS_RATIOS, confusion_matrix, evaluate_segmentation, predict_probs, segmentation_metrics
from .segmentation import AUX_LOSS_WEIGHT, UperNet, load_backbone_weights, load_upernet_weights, upernet

__all__ = [
    "AUX_LOSS_WEIGHT",
    "IGNORE_INDEX",
    "MS_RATIOS",
    "SEG_DEMO_CLASSES",
    "SegmentationDataset",
    "UperNet",
    "build_seg_transform",
    "confusion_matrix",
    "evaluate_segmentation",
    "load_backbone_weights",
    "load_upernet_weights",
    "make_seg_demo_dataset",
    "predict_probs",
    "segmentation_metrics",
    "upernet",
]
