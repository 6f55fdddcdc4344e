"""Instance detection and segmentation (Mask R-CNN) as a :class:`~mlla.engine.task.Task` of the
one training engine: COCO-format data, torchvision's loss dict, COCO box and mask AP."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...engine.distributed import DistEnv
from ...engine.task import Task
from ..registry import register_task
from .coco import COCO_METRICS, CocoDetection, coco_evaluate, collate_detection, detections_to_coco
from .demo import make_det_demo_dataset
from .model import mask_rcnn
from .settings import DET_PRESETS, DetectionConfig, default_preset

__all__ = ["DetectionTask", "coco_split_paths", "detect_by_size", "evaluate_detector"]

_logger = logging.getLogger(__name__)


def coco_split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(DIR/annotations/instances_SPLIT.json, DIR/SPLIT)``: the COCO layout (``split`` e.g.
    ``train2017``); raises FileNotFoundError saying what is expected."""
    root = Path(data_dir)
    ann, images = root / "annotations" / f"instances_{split}.json", root / split
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    if not ann.is_file() or not images.is_dir():
        raise FileNotFoundError(
            f"no '{split}' split in {root}: expected {ann} and the image folder {images} (COCO layout: "
            f"DIR/annotations/instances_<split>.json and DIR/<split>/<images>)"
        )
    return ann, images


def detect_by_size(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A detector's outputs for ``images`` (``(3, H_i, W_i)`` each), in their order, running the
    images of each size as one batch.

    torchvision's detectors pad a batch to its largest image, and a backbone with global
    attention (MLLA's linear attention) sees that padding: an image's detections would depend
    on the other images of its batch. Images of one size are resized alike and need no padding
    between them, so grouped this way every image is detected as it is alone, at any batch size.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    outputs: list[Any] = [None] * len(images)
    for indices in groups.values():
        for i, out in zip(indices, model([images[i] for i in indices])):
            outputs[i] = out
    return outputs


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv = DistEnv(),
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """COCO box and mask AP of a detector over a loader of :class:`~.coco.CocoDetection`.

    Images of one size run together (:func:`detect_by_size`), so the result does not depend
    on the batch size. Every process runs its share of the images; the detections are gathered and scored on
    rank 0 with pycocotools and the result is broadcast. Returns ``bbox_AP``, ``bbox_AP50``,
    ``bbox_AP75``, ``bbox_APs``, ``bbox_APm``, ``bbox_APl`` and the same for ``segm_`` (percent;
    see :func:`~.coco.coco_evaluate`), ``images`` (evaluated) and ``skipped`` (unreadable).
    """
    dataset: CocoDetection = loader.dataset
    was_training = model.training
    model.eval()
    boxes, masks, image_ids, skipped = [], [], [], 0
    for images, targets, n_skipped in tqdm(loader, desc=desc, leave=False, disable=not (progress and env.is_main)):
        skipped += n_skipped
        if not images:
            continue
        with autocast():
            outputs = detect_by_size(model, [im.to(env.device, non_blocking=True) for im in images])
        ids = [t["image_id"] for t in targets]
        b, m = detections_to_coco(zip(ids, outputs), dataset.label_to_cat_id)
        boxes += b
        masks += m
        image_ids += ids
    model.train(was_training)
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, (boxes, masks, image_ids, skipped))
        boxes = [d for g in gathered for d in g[0]]
        masks = [d for g in gathered for d in g[1]]
        image_ids = [i for g in gathered for i in g[2]]
        skipped = sum(g[3] for g in gathered)
    if not image_ids:
        raise RuntimeError(f"no readable images to evaluate ({skipped} unreadable)")
    result: list[Any] = [None]
    if env.is_main:
        result[0] = coco_evaluate(dataset.coco_gt, {"bbox": boxes, "segm": masks}, image_ids)
    if env.distributed:
        dist.broadcast_object_list(result, src=0)
    return dict(result[0], images=len(image_ids), skipped=skipped)


@register_task
class DetectionTask(Task):
    """Mask R-CNN on COCO-format data (``DIR/annotations/instances_<split>.json``, ``DIR/<split>/``),
    with the settings of :class:`~.settings.DetectionConfig`."""

    name = "detection"
    settings = DetectionConfig
    presets = DET_PRESETS
    default_preset = staticmethod(default_preset)
    state_keys = ("categories",)
    label_kind = "categories"
    evaluator = staticmethod(evaluate_detector)
    best_metric = "bbox_AP"
    best_metric_label = "box AP"
    find_unused_parameters = False
    compile_unsupported = ("torchvision's Mask R-CNN sizes its tensors by the data (images of many sizes, a "
                           "varying number of proposals and boxes), which torch.compile would recompile for or break on")
    cfg: DetectionConfig

    def __init__(self, cfg: DetectionConfig) -> None:
        super().__init__(cfg)
        self.categories: list[dict[str, Any]] = []

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def make_demo_data(self, root: Path, *, progress: bool) -> Path:
        return make_det_demo_dataset(root, progress=progress)

    def build_datasets(self, data_dir: Path, env: DistEnv) -> tuple[CocoDetection, CocoDetection | None]:
        cfg = self.cfg
        ann, images = coco_split_paths(data_dir, cfg.train_split)
        train_set = CocoDetection(ann, images, train=True, hflip=cfg.hflip, skip_empty=cfg.det_skip_empty, seed=cfg.seed)
        self.categories = train_set.categories
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ValueError(f"--num-classes {cfg.num_classes} but {ann} has {self.num_classes} categories")
        try:
            return train_set, self.build_eval_dataset(data_dir, cfg.val_split)
        except FileNotFoundError as e:
            _logger.warning("%s: training without validation (best.pth follows the training loss)", e)
            return train_set, None

    def build_eval_dataset(self, data_dir: Path, split: str) -> CocoDetection:
        ann, images = coco_split_paths(data_dir, split)
        return CocoDetection(ann, images, categories=self.categories)

    def collate(self, samples: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
        return collate_detection(samples)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return mask_rcnn(
            cfg.model, self.num_classes, backbone_checkpoint=cfg.initial_checkpoint, drop_path_rate=cfg.drop_path,
            min_size=tuple(cfg.det_min_sizes), max_size=cfg.det_max_size, **cfg.model_kwargs,
        )

    def training_loss(
        self, model: nn.Module, inputs: list[torch.Tensor], targets: list[dict[str, Any]], *, ema: nn.Module | None, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = model(inputs, targets)
        loss = sum(v.float() for v in losses.values())
        return loss, {k: v.item() for k, v in losses.items()}

    def describe(self, metrics: dict[str, float]) -> str:
        return (f"box AP {metrics['bbox_AP']:.1f} (AP50 {metrics['bbox_AP50']:.1f}), "
                f"mask AP {metrics['segm_AP']:.1f} (AP50 {metrics['segm_AP50']:.1f})")

    def state(self) -> dict[str, Any]:
        return dict(categories=self.categories)

    def restore(self, state: dict[str, Any]) -> None:
        self.categories = list(state["categories"])


def format_ap_table(metrics: dict[str, float]) -> str:
    """The paper's table columns (AP, AP50, AP75, APs, APm, APl) for boxes and masks, as Markdown."""
    lines = ["| | " + " | ".join(COCO_METRICS) + " |", "|---|" + "---|" * len(COCO_METRICS)]
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        if f"{kind}_AP" in metrics:
            lines.append(f"| {label} | " + " | ".join(f"{metrics[f'{kind}_{m}']:.1f}" for m in COCO_METRICS) + " |")
    return "\n".join(lines)
