"""Data pieces every task shares: an ImageFolder that survives bad samples, image modes,
safe augmentation, transforms, loaders that count failed samples."""
from .auto_augment import harden_auto_augment
from .dataset import IMG_EXTENSIONS, ImageFolderDataset, collate_skipping, find_split
from .failures import FailureLog, SampleFailure, Skipped, TooManyFailedSamples
from .images import to_rgb
from .loader import CountingLoader, ResumableSampler, available_cores, build_loader, default_workers
from .transforms import build_transform

__all__ = [
    "CountingLoader",
    "FailureLog",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ResumableSampler",
    "SampleFailure",
    "Skipped",
    "TooManyFailedSamples",
    "available_cores",
    "build_loader",
    "build_transform",
    "collate_skipping",
    "default_workers",
    "find_split",
    "harden_auto_augment",
    "to_rgb",
]
