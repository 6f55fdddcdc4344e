"""Image classification on ImageFolder data or the generated demo set (``mlla train``, ``mlla validate``)."""
from .demo import DEMO_CLASSES, make_demo_dataset
from .evaluate import evaluate
from .task import ClassificationTask

__all__ = ["DEMO_CLASSES", "ClassificationTask", "evaluate", "make_demo_dataset"]
