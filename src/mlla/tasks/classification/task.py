"""Image classification as a :class:`~mlla.engine.task.Task`: ImageFolder data, the paper's
recipe (RandAugment, random erasing, Mixup/CutMix, label smoothing, MESA) and top-1/top-5."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ...checkpoint import load_checkpoint
from ...data import IMG_EXTENSIONS, ImageFolderDataset, build_transform, collate_skipping, find_split
from ...engine.distributed import DistEnv
from ...engine.preflight import SettingsError
from ...engine.task import Task
from ...models import create_model
from ..registry import register_task
from .demo import make_demo_dataset
from .evaluate import evaluate
from .settings import PRESETS, ClassificationConfig, default_preset

__all__ = ["ClassificationTask", "check_image_folder"]

_logger = logging.getLogger(__name__)

#: Smallest ``img_size``: MLLA downsamples by 32 (4 at the stem, 2 at each of three merges).
MIN_IMG_SIZE = 32


def _has_image(folder: Path) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_image_folder(cfg: ClassificationConfig) -> None:
    """Refuse ``cfg.data_dir`` unless it is an ImageFolder with images of two classes or more."""
    root = Path(cfg.data_dir)
    layout = f"expected {root}/{cfg.train_split}/<class>/<images> (and {root}/{cfg.val_split}/<class>/<images>)"
    if not root.is_dir():
        raise SettingsError(f"--data-dir {root} does not exist or is not a folder; {layout}")
    train = root / cfg.train_split
    if not train.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise SettingsError(
            f"--data-dir {root} has no '{cfg.train_split}' folder (found: {', '.join(found) or 'nothing'}); {layout}, "
            f"or name the split with --train-split"
        )
    classes = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    with_images = []
    for c in classes:  # stop at two: enough to know, cheap on ImageNet
        if _has_image(c):
            with_images.append(c.name)
            if len(with_images) == 2:
                break
    if not with_images:
        raise SettingsError(
            f"{train} holds no images in class folders ({len(classes)} class folders; images are "
            f"{', '.join(IMG_EXTENSIONS)}); {layout}"
        )
    if len(with_images) == 1:
        raise SettingsError(
            f"{train} has images of one class only ({with_images[0]}): a classifier of one class learns nothing "
            f"(its loss is 0 and its accuracy 100% from the start); add a folder per class, {layout}"
        )


@register_task
class ClassificationTask(Task):
    """Classify images of an ImageFolder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``)."""

    name = "classification"
    settings = ClassificationConfig
    presets = PRESETS
    default_preset = staticmethod(default_preset)
    state_keys = ("class_to_idx",)
    evaluator = staticmethod(evaluate)
    best_metric = "top1"
    best_metric_label = "top-1 (%)"
    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig) -> None:
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

    def check_settings(self) -> list[str]:
        cfg = self.cfg
        if isinstance(cfg.img_size, bool) or not isinstance(cfg.img_size, int) or cfg.img_size < MIN_IMG_SIZE:
            raise SettingsError(
                f"--img-size must be a whole number of at least {MIN_IMG_SIZE} (the model downsamples by 32), "
                f"got {cfg.img_size!r}; e.g. --img-size 224 (or 32 for tiny images)"
            )
        if cfg.data_dir is not None:
            check_image_folder(cfg)
        return []

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
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
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

    def evaluate_options(self) -> dict[str, Any]:
        return dict(channels_last=self.cfg.channels_last)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%"

    def state(self) -> dict[str, Any]:
        return dict(class_to_idx=self.class_to_idx)

    def restore(self, state: dict[str, Any]) -> None:
        self.class_to_idx = dict(state["class_to_idx"])
