"""Settings of the segmentation task (``mlla seg train``): the shared run settings plus mmseg's
ADE20K data pipeline, UperNet's widths and the validation inference; the paper's ADE20K recipe
(SPEC section 5) and the built-in demo as presets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...engine.config import TrainConfig, setting

__all__ = ["PRESETS", "SegmentationConfig", "default_preset"]

_SEG = "segmentation"


@dataclass
class SegmentationConfig(TrainConfig):
    """:class:`~mlla.engine.config.TrainConfig` and what segmentation adds (mmseg's ADE20K recipe)."""

    task: str = setting("segmentation", group="run", flag=False)
    no_aug: bool = setting(False, "no photometric distortion", group="data")
    hflip: float = setting(0.5, "horizontal flip probability", group="data")
    seg_crop_size: int = setting(512, "training crop and sliding window", group=_SEG)
    seg_scale: tuple[int, int] = setting((2048, 512), "long,short edge bounds of the keep-ratio resize", group=_SEG)
    seg_ratio_range: tuple[float, float] = setting((0.5, 2.0), "training resize ratios of --seg-scale", group=_SEG)
    seg_cat_max_ratio: float = setting(0.75, "redraw crops where one class covers more (1: off)", group=_SEG)
    seg_reduce_zero_label: bool = setting(True, "label 0 is unlabelled (ADE20K); labels shift by -1", group=_SEG)
    seg_channels: int = setting(512, "UperNet width", group=_SEG)
    seg_aux_channels: int = setting(256, "auxiliary FCN head width", group=_SEG)
    seg_aux_weight: float = setting(0.4, "auxiliary loss weight (0: no auxiliary head)", group=_SEG)
    seg_test_mode: str = setting("whole", "validation inference: whole image or sliding windows", group=_SEG,
                                 choices=("whole", "slide"))
    seg_stride: int = setting(341, "sliding-window stride", group=_SEG)

    def run_dir(self) -> Path:
        """The run folder: ``output``, or ``runs/upernet_<model>``."""
        return Path(self.output) if self.output else Path("runs") / f"upernet_{self.model or 'model'}"

    def unused(self) -> set[str]:
        unused = super().unused()
        if self.seg_test_mode != "slide":
            unused.add("seg_stride")
        if not self.seg_aux_weight:
            unused.add("seg_aux_channels")
        return unused


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ADE20K recipe (SPEC section 5, mmseg's UperNet schedule): 160k iterations at a
    # total batch of 16 = 127 epochs of ADE20K's 20,210 training images (1,263 steps each), 512
    # crops, AdamW lr 6e-5 wd 0.01, 1,500 linear warm-up steps from 1e-6 of the rate, then poly
    # (power 1) to 0. The backbone's drop path is the model's own (MLLA-B: 0.5; --drop-path sets it).
    "ade20k-160k": dict(
        model="mlla_base",
        num_classes=150,
        train_split="training",
        val_split="validation",
        epochs=127,
        batch_size=16,
        opt="adamw",
        opt_betas=(0.9, 0.999),
        weight_decay=0.01,
        lr_base=6e-5,
        warmup_lr_base=6e-11,
        min_lr_base=0.0,
        lr_base_size=16,
        sched="poly",
        poly_power=1.0,
        warmup_steps=1500,
        clip_grad=None,
        amp=True,
        model_ema=False,
        workers=4,
        seg_crop_size=512,
        seg_scale=(2048, 512),
        seg_ratio_range=(0.5, 2.0),
        seg_cat_max_ratio=0.75,
        seg_test_mode="whole",
    ),
    # UperNet on a small MLLA over the generated segmentation scenes
    # (mlla.tasks.segmentation.demo), a few minutes on 2 CPU cores.
    "demo": dict(
        model="test_mlla",
        train_split="training",
        val_split="validation",
        epochs=20,
        batch_size=8,
        opt="adamw",
        weight_decay=0.01,
        lr_base=3e-3,
        warmup_lr_base=1e-5,
        min_lr_base=0.0,
        lr_base_size=8,
        sched="poly",
        poly_power=1.0,
        warmup_steps=50,
        clip_grad=None,
        amp=False,
        model_ema=False,
        drop_path=0.0,
        workers=0,
        seg_crop_size=48,
        seg_scale=(96, 48),
        seg_ratio_range=(0.75, 1.5),
        seg_cat_max_ratio=0.75,
        seg_channels=32,
        seg_aux_channels=16,
        seg_test_mode="whole",
    ),
}


def default_preset(given: dict[str, Any]) -> str:
    """Without --preset and --config: ade20k-160k with --data-dir, the demo without."""
    return "ade20k-160k" if "data_dir" in given else "demo"
