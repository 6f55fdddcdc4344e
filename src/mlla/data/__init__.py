"""Datasets (ImageFolder that survives bad files, the generated demo set), transforms, loaders."""
from .dataset import IMG_EXTENSIONS, ImageFolderDataset, collate_skipping, find_split
from .demo import DEMO_CLASSES, make_demo_dataset
from .loader import ResumableSampler, build_loader
from .transforms import build_transform

__all__ = [
    "DEMO_CLASSES",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ResumableSampler",
    "build_loader",
    "build_transform",
    "collate_skipping",
    "find_split",
    "make_demo_dataset",
]
