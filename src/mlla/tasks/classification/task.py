"""Image classification as a :class:`~mlla.engine.task.Task`: ImageFolder data, the paper's
recipe (RandAugment, random erasing, Mixup/CutMix, label smoothing, MESA) and top-1/top-5."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from ...checkpoint import CheckpointError, load_checkpoint
from ...data import ImageFolderDataset, build_transform, collate_skipping, find_split
from .demo import make_demo_dataset
from ...models import create_model
from ...engine.distributed import DistEnv
from .evaluate import evaluate
from ...engine.task import Task

__all__ = ["ClassificationTask"]

_logger = logging.getLogger(__name__)


class ClassificationTask(Task):
    """Classify images of an ImageFolder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``)."""

    name = "classification"
    best_metric = "top1"
    best_metric_label = "top-1 (%)"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.class_to_idx: dict[str, int] = {}
        self.mixup: Mixup | None = None
        self.criterion: nn.Module = nn.CrossEntropyLoss()
        self.mesa_criterion = SoftTargetCrossEntropy()
        self.mesa_start_epoch = math.ceil(cfg.mesa_start * cfg.epochs)
        if cfg.mesa > 0 and not cfg.model_ema:
            raise ValueError("MESA (--mesa > 0) learns from the EMA model: turn on --model-ema or set --mesa 0")

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)

    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        return make_demo_dataset(root, progress=progress)

    def build_datasets(self, data_dir: Path, env: DistEnv) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        cfg = self.cfg
        transform_args = dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
        # Transforms need the model's mean/std: build them from a meta-device copy's config.
        with torch.device("meta"):
            probe = create_model(cfg.model, num_classes=0, **cfg.model_kwargs)
        train_tf = build_transform(
            probe, is_training=True, no_aug=cfg.no_aug, scale=cfg.scale, hflip=cfg.hflip, aa=cfg.aa,
            color_jitter=cfg.color_jitter, reprob=cfg.reprob, remode=cfg.remode, **transform_args,
        )
        train_set = ImageFolderDataset(find_split(data_dir, cfg.train_split), train_tf, replace_bad=True, seed=cfg.seed)
        self.class_to_idx = train_set.class_to_idx
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ValueError(f"--num-classes {cfg.num_classes} but {train_set.root} has {self.num_classes} class folders")
        self._build_loss()
        try:
            val_root = find_split(data_dir, cfg.val_split)
        except FileNotFoundError as e:
            _logger.warning("%s: training without validation (best.pth follows the training loss); put held-out "
                            "images in %s/<class>/ to measure accuracy", e, data_dir / cfg.val_split)
            return train_set, None
        val_tf = build_transform(probe, is_training=False, **transform_args)
        return train_set, ImageFolderDataset(val_root, val_tf, class_to_idx=self.class_to_idx)

    def _build_loss(self) -> None:
        cfg = self.cfg
        if not cfg.no_aug and (cfg.mixup > 0 or cfg.cutmix > 0):
            if cfg.batch_size % 2:
                raise ValueError(f"Mixup/CutMix need an even --batch-size, got {cfg.batch_size}")
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=self.num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def collate(self, samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return collate_skipping(samples)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        kwargs = dict(cfg.model_kwargs, num_classes=self.num_classes)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **kwargs)
        if cfg.initial_checkpoint:
            load_checkpoint(model, cfg.initial_checkpoint, allow_head_mismatch=True, use_ema=cfg.initial_checkpoint_ema)
            _logger.info("initial weights from %s%s", cfg.initial_checkpoint, " (EMA)" if cfg.initial_checkpoint_ema else "")
        return model

    def training_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, ema: nn.Module | None, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        logits = model(inputs)
        loss = self.criterion(logits.float(), targets)
        if self.cfg.mesa > 0 and ema is not None and epoch >= self.mesa_start_epoch:
            with torch.no_grad():
                teacher = ema(inputs).float().softmax(dim=-1)
            loss = loss + self.cfg.mesa * self.mesa_criterion(logits.float(), teacher)
        return loss, {}

    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        env: DistEnv,
        *,
        autocast: Callable[[], ContextManager],
        progress: bool,
        desc: str,
    ) -> dict[str, float]:
        metrics = evaluate(model, loader, env, autocast=autocast, channels_last=self.cfg.channels_last, progress=progress, desc=desc)
        metrics.pop("images")
        return metrics

    def describe(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%"

    def state(self) -> dict[str, Any]:
        return dict(class_to_idx=self.class_to_idx)

    def check_resume(self, checkpoint: dict[str, Any], path: Path) -> None:
        saved = checkpoint.get("class_to_idx")
        if saved is not None and saved != self.class_to_idx:
            raise CheckpointError(
                f"{path} was trained on {len(saved)} classes but the data has {self.num_classes} (or other "
                f"names); resume on the same data, or fine-tune from it with --initial-checkpoint {path} and a new --output"
            )
