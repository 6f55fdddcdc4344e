"""Dense prediction on MLLA backbones: detection (Mask R-CNN) and segmentation (UperNet)."""
from .coco import CocoDetection, coco_evaluate
from .demo import make_det_demo_dataset
from .detection import load_backbone_checkpoint, mask_rcnn

__all__ = ["CocoDetection", "coco_evaluate", "load_backbone_checkpoint", "make_det_demo_dataset", "mask_rcnn"]
