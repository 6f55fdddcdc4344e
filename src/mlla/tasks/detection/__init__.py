"""Mask R-CNN detection and instance segmentation on COCO-format data (``mlla det``)."""
