"""Settings of the detection task (``mlla det train``): the shared run settings plus the
multi-scale input sizes, flips and empty-image handling; the paper's COCO Mask R-CNN schedules
(SPEC section 5) and the built-in demo as presets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...engine.config import TrainConfig, setting

__all__ = ["DET_PRESETS", "DetectionConfig", "default_preset"]


@dataclass
class DetectionConfig(TrainConfig):
    """:class:`~mlla.engine.config.TrainConfig` and what detection adds. ``model`` names the
    backbone; ``model_kwargs`` are more :func:`~mlla.tasks.detection.model.mask_rcnn` options
    (e.g. ``fpn_channels``, ``backbone_kwargs``); ``initial_checkpoint`` gives backbone weights."""

    task: str = setting("detection", group="run", flag=False)
    hflip: float = setting(0.5, "horizontal flip probability", group="data")
    det_min_sizes: tuple[int, ...] = setting(tuple(range(480, 801, 32)), "shorter image side, one sampled per batch in "
                                             "training (the last in evaluation), e.g. 480,512,...,800", group="data")
    det_max_size: int = setting(1333, "cap on the longer image side", group="data")
    det_skip_empty: bool = setting(True, "leave training images without annotations out (counted)", group="data")

    def run_dir(self) -> Path:
        """The run folder: ``output``, or ``runs/det-<model>``."""
        return Path(self.output) if self.output else Path("runs") / f"det-{self.model or 'model'}"

# The paper's Mask R-CNN recipe (mmdetection's 1x/3x schedules): AdamW lr 1e-4 at 16 images per
# step (scaled linearly with the actual total batch), weight decay 0.05 (none on norms and
# biases), 500 linear warm-up iterations from 1e-3 x lr, x0.1 at the milestones, multi-scale
# training (shorter side 480-800 in steps of 32, longer side at most 1333), horizontal flip,
# evaluation at 800 x 1333. 16 images = 8 GPUs x 2 (torchrun --nproc_per_node 8).
_COCO = dict(
    model="mlla_tiny",
    train_split="train2017",
    val_split="val2017",
    batch_size=2,
    opt="adamw",
    opt_betas=(0.9, 0.999),
    opt_eps=1e-8,
    weight_decay=0.05,
    lr_base=1e-4,
    lr_base_size=16,
    warmup_lr_base=1e-7,
    warmup_steps=500,
    sched="step",
    decay_rate=0.1,
    clip_grad=None,
    amp=True,
    hflip=0.5,
    det_min_sizes=tuple(range(480, 801, 32)),
    det_max_size=1333,
    det_skip_empty=True,
    model_ema=False,
    workers=4,
)

DET_PRESETS: dict[str, dict[str, Any]] = {
    "coco-1x": dict(_COCO, epochs=12, decay_milestones=(8, 11), drop_path=0.1),
    "coco-3x": dict(_COCO, epochs=36, decay_milestones=(27, 33), drop_path=0.3),
    # The built-in demo (mlla.tasks.detection.demo: shapes with instance masks, 160 px): a smaller MLLA
    # and slimmer heads (FPN and mask head 64 channels, box head 256), fewer proposals, so that
    # it trains in minutes on 2 CPU cores. Float32 (bfloat16 autocast is slow on most CPUs).
    "demo": dict(
        _COCO,
        model="test_mlla",
        model_kwargs=dict(
            backbone_kwargs=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8]),
            fpn_channels=64,
            mask_head_channels=64,
            box_representation_size=256,
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=150,
            rpn_batch_size_per_image=128,
            box_batch_size_per_image=128,
        ),
        train_split="train",
        val_split="val",
        epochs=6,
        batch_size=8,
        lr_base=1e-3,
        lr_base_size=8,
        warmup_lr_base=1e-5,
        warmup_steps=50,
        decay_milestones=(5,),
        drop_path=0.0,
        amp=False,
        clip_grad=5.0,
        det_min_sizes=(128, 144, 160),
        det_max_size=160,
        workers=0,
    ),
}


def default_preset(given: dict[str, Any]) -> str:
    """Without --preset and --config: coco-1x with --data-dir, the demo without."""
    return "coco-1x" if "data_dir" in given else "demo"
