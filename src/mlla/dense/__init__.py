"""Dense prediction on MLLA backbones: Mask R-CNN detection on COCO-format data (``mlla det``) and
UperNet semantic segmentation on ADE20K-layout data (``mlla seg``), trained by the one engine."""
from .ade import IGNORE_INDEX, SegmentationDataset, build_seg_transform
from .coco import CocoDetection, coco_evaluate
from .demo import make_det_demo_dataset
from .backbone import load_backbone_checkpoint
from .detection import mask_rcnn
from .seg_demo import SEG_DEMO_CLASSES, make_seg_demo_dataset
from .seg_eval import MS_RATIOS, confusion_matrix, evaluate_segmentation, predict_probs, segmentation_metrics
from .segmentation import AUX_LOSS_WEIGHT, UperNet, load_upernet_weights, upernet

__all__ = [
    "AUX_LOSS_WEIGHT",
    "CocoDetection",
    "IGNORE_INDEX",
    "MS_RATIOS",
    "SEG_DEMO_CLASSES",
    "SegmentationDataset",
    "UperNet",
    "build_seg_transform",
    "coco_evaluate",
    "confusion_matrix",
    "evaluate_segmentation",
    "load_backbone_checkpoint",
    "load_upernet_weights",
    "make_det_demo_dataset",
    "make_seg_demo_dataset",
    "mask_rcnn",
    "predict_probs",
    "segmentation_metrics",
    "upernet",
]
