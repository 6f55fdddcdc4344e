"""The tasks a run can train and evaluate, each in a folder of its own above the engine:
:mod:`.classification`, :mod:`.detection` (Mask R-CNN on COCO-format data),
:mod:`.segmentation` (UperNet on ADE20K-layout data) and :mod:`.study` (the paper's design study).
Each holds its settings and presets, model builder, data, evaluation, demo data and pictures, and
registers its :class:`~mlla.engine.task.Task` in :data:`TASKS` (see docs/architecture.md)."""
from .registry import TASKS, register_task
from .classification.task import ClassificationTask
from .detection.task import DetectionTask
from .segmentation.task import SegmentationTask

__all__ = ["TASKS", "ClassificationTask", "DetectionTask", "SegmentationTask", "register_task"]
