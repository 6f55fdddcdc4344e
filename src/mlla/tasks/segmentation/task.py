"""Semantic segmentation as a :class:`~mlla.engine.task.Task`: ADE20K-layout data, UperNet on an
MLLA backbone, cross-entropy of the main and auxiliary heads, mIoU / mAcc / aAcc."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.distributed import DistEnv
from ...engine.task import Task
from ..registry import register_task
from .ade import IGNORE_INDEX, SegmentationDataset, build_seg_transform, collate_segmentation
from .demo import make_seg_demo_dataset
from .evaluate import evaluate_segmentation
from .model import UperNet, load_upernet_weights, upernet
from .settings import PRESETS, SegmentationConfig, default_preset

__all__ = ["SegmentationTask", "read_class_names", "segmentation_loss"]

_logger = logging.getLogger(__name__)


def read_class_names(root: str | Path) -> list[str] | None:
    """Class names of a dataset folder: ``classes.json`` (a list), or ADE20K's ``objectInfo150``
    table (``.txt`` tab-separated or ``.csv``, last column; first synonym); None without either."""
    root = Path(root)
    if (root / "classes.json").is_file():
        return [str(c) for c in json.loads((root / "classes.json").read_text())]
    for name, sep in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        path = root / name
        if path.is_file():
            lines = [line for line in path.read_text().splitlines()[1:] if line.strip()]
            return [line.split(sep)[-1].split(";")[0].split(",")[0].strip().strip('"') for line in lines]
    return None


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels (0, not NaN, for a batch with none)."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp_min(1)


@register_task
class SegmentationTask(Task):
    """Label every pixel of ADE20K-layout data (``images/`` and ``annotations/``, each with
    ``training/`` and ``validation/``), with the settings of :class:`~.settings.SegmentationConfig`;
    ``best.pth`` follows the validation mIoU."""

    name = "segmentation"
    settings = SegmentationConfig
    presets = PRESETS
    default_preset = staticmethod(default_preset)
    state_keys = ("seg_classes",)
    evaluator = staticmethod(evaluate_segmentation)
    best_metric = "mIoU"
    best_metric_label = "mIoU (%)"
    cfg: SegmentationConfig

    def __init__(self, cfg: SegmentationConfig) -> None:
        super().__init__(cfg)
        if cfg.seg_test_mode not in ("whole", "slide"):
            raise ValueError(f"--seg-test-mode must be 'whole' or 'slide', got {cfg.seg_test_mode!r}")
        self.classes: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        return make_seg_demo_dataset(root, progress=progress)

    def build_datasets(self, data_dir: Path, env: DistEnv) -> tuple[SegmentationDataset, SegmentationDataset | None]:
        cfg = self.cfg
        names = read_class_names(data_dir)
        num_classes = cfg.num_classes or (len(names) if names else None)
        if num_classes is None:
            raise ValueError(
                f"{data_dir} has no classes.json or objectInfo150.txt to count the classes from: pass --num-classes "
                "(150 for ADE20K)"
            )
        if names is not None and len(names) != num_classes:
            raise ValueError(f"--num-classes {num_classes} but {data_dir} names {len(names)} classes")
        # Unnamed classes are called by their value in the annotation files (class i is value i + 1
        # when 0 means unlabelled).
        shift = int(cfg.seg_reduce_zero_label)
        self.classes = names or [f"label {i + shift}" for i in range(num_classes)]
        train_tf = build_seg_transform(
            True, crop_size=cfg.seg_crop_size, scale=cfg.seg_scale, ratio_range=cfg.seg_ratio_range,
            cat_max_ratio=cfg.seg_cat_max_ratio, hflip=cfg.hflip, photometric=not cfg.no_aug,
        )
        train_set = SegmentationDataset(data_dir, cfg.train_split, train_tf, replace_bad=True, seed=cfg.seed,
                                        num_classes=num_classes, reduce_zero_label=cfg.seg_reduce_zero_label)
        if not (data_dir / "images" / cfg.val_split).is_dir():
            _logger.warning("%s has no images/%s: training without validation", data_dir, cfg.val_split)
            return train_set, None
        return train_set, self.build_eval_dataset(data_dir, cfg.val_split)

    def build_eval_dataset(self, data_dir: Path, split: str) -> SegmentationDataset:
        return SegmentationDataset(data_dir, split, build_seg_transform(False), num_classes=self.num_classes,
                                   reduce_zero_label=self.cfg.seg_reduce_zero_label)

    def collate(self, samples: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        return collate_segmentation(samples)

    def build_model(self) -> UperNet:
        cfg = self.cfg
        kwargs = dict(cfg.model_kwargs)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = upernet(
            cfg.model, self.num_classes, aux_head=cfg.seg_aux_weight > 0, channels=cfg.seg_channels,
            aux_channels=cfg.seg_aux_channels, **kwargs,
        )
        if cfg.initial_checkpoint:
            load_upernet_weights(model, cfg.initial_checkpoint)
        return model

    def to_device(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batches: crops of one size (padded to the crop size), stacked."""
        images = torch.stack(inputs).to(device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.stack(targets).to(device, non_blocking=True)

    def training_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, ema: nn.Module | None, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits, aux = model(inputs)
        main = segmentation_loss(logits, targets)
        if aux is None:
            return main, {}
        aux_loss = segmentation_loss(aux, targets)
        return main + self.cfg.seg_aux_weight * aux_loss, dict(loss_main=main.item(), loss_aux=aux_loss.item())

    def inference_options(self) -> dict[str, Any]:
        """Validation inference settings (:func:`mlla.tasks.segmentation.evaluate.predict_probs` options)."""
        cfg = self.cfg
        return dict(scale=cfg.seg_scale, mode=cfg.seg_test_mode, crop_size=cfg.seg_crop_size, stride=cfg.seg_stride)

    def evaluate_options(self) -> dict[str, Any]:
        return dict(self.inference_options(), num_classes=self.num_classes)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"mIoU {metrics['mIoU']:.2f}% mAcc {metrics['mAcc']:.2f}% aAcc {metrics['aAcc']:.2f}%"

    def state(self) -> dict[str, Any]:
        return dict(seg_classes=list(self.classes))

    def restore(self, state: dict[str, Any]) -> None:
        self.classes = list(state["seg_classes"])
