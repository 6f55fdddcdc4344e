"""Dense prediction on MLLA backbones: Mask R-CNN detection on COCO-format data (``mlla det``) and
UperNet semantic segmentation on ADE20K-layout data (``mlla seg``), trained by the one engine."""
from ..tasks.segmentation.ade import IGNORE_INDEX, SegmentationDataset, build_seg_transform
from ..tasks.detection.coco import CocoDetection, coco_evaluate
from ..tasks.detection.demo import make_det_demo_dataset
from ..models.backbone import load_backbone_checkpoint
from ..tasks.detection.model import mask_rcnn
from ..tasks.segmentation.demo import SEG_DEMO_CLASSES, make_seg_demo_dataset
from ..tasks.segmentation.evaluate import MS_RATIOS, confusion_matrix, evaluate_segmentation, predict_probs, segmentation_metrics
from ..tasks.segmentation.model import AUX_LOSS_WEIGHT, UperNet, load_upernet_weights, upernet

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
