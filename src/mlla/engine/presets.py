"""Recipe presets: the paper's ImageNet-1K recipe per model size (SPEC section 4), a
fine-tuning preset and the built-in demo.

A preset is a plain dict of :class:`~mlla.engine.config.TrainConfig` fields; it is applied over
the defaults, and a YAML file and command-line flags are applied over it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "get_preset"]

# The authors' ImageNet-1K recipe (SPEC section 4). The learning rates are given at a total
# batch of 512 and scaled linearly with the actual total batch; the EMA decay is given at a total
# batch of 4096 and rescaled as decay ** (batch / 4096).
_IMAGENET = dict(
    epochs=300,
    batch_size=128,
    img_size=224,
    opt="adamw",
    opt_betas=(0.9, 0.999),
    opt_eps=1e-8,
    weight_decay=0.05,
    lr_base=5e-4,
    warmup_lr_base=5e-7,
    min_lr_base=5e-6,
    lr_base_size=512,
    warmup_epochs=20,
    clip_grad=5.0,
    amp=True,
    aa="rand-m9-mstd0.5-inc1",
    color_jitter=0.4,
    reprob=0.25,
    remode="pixel",
    mixup=0.8,
    cutmix=1.0,
    mixup_switch_prob=0.5,
    smoothing=0.1,
    interpolation="bicubic",
    crop_pct=0.875,
    model_ema=True,
    model_ema_decay=0.9996,
    model_ema_decay_batch=4096,
    mesa_start=0.25,
)

PRESETS: dict[str, dict[str, Any]] = {
    "mlla_tiny": dict(_IMAGENET, model="mlla_tiny", drop_path=0.2, mesa=1.0),
    "mlla_small": dict(_IMAGENET, model="mlla_small", drop_path=0.3, mesa=1.5),
    "mlla_base": dict(_IMAGENET, model="mlla_base", drop_path=0.5, mesa=2.0),
    # Not from the paper: a starting point for fine-tuning a trained model on your own data
    # (new classifier, lighter regularisation, short schedule). Give --initial-checkpoint.
    "finetune": dict(
        _IMAGENET,
        model="mlla_tiny",
        epochs=30,
        lr_base=1e-4,
        warmup_lr_base=1e-7,
        min_lr_base=1e-6,
        warmup_epochs=2,
        mixup=0.0,
        cutmix=0.0,
        reprob=0.0,
        drop_path=0.1,
        model_ema=False,
        mesa=0.0,
    ),
    # The README's main command: a small MLLA on the generated demo dataset (mlla.tasks.classification.demo),
    # a few minutes on 2 CPU cores. Float32 (bfloat16 autocast is slow on CPUs without AMX).
    "demo": dict(
        model="test_mlla",
        model_kwargs={"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8)},
        epochs=6,
        batch_size=64,
        img_size=32,
        lr_base=2e-3,
        warmup_lr_base=1e-5,
        min_lr_base=1e-5,
        lr_base_size=64,
        warmup_epochs=1,
        weight_decay=0.05,
        clip_grad=5.0,
        amp=False,
        aa=None,
        color_jitter=0.0,
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
        smoothing=0.1,
        scale=(0.6, 1.0),
        crop_pct=1.0,
        interpolation="bicubic",
        drop_path=0.0,
        model_ema=True,
        model_ema_decay=0.95,
        model_ema_decay_batch=0,
        mesa=0.0,
        workers=0,
    ),
    # The paper's ADE20K recipe (SPEC section 5, mmseg's UperNet schedule): 160k iterations at a
    # total batch of 16 = 127 epochs of ADE20K's 20,210 training images (1,263 steps each), 512
    # crops, AdamW lr 6e-5 wd 0.01, 1,500 linear warm-up steps from 1e-6 of the rate, then poly
    # (power 1) to 0. The backbone's drop path is the model's own (MLLA-B: 0.5; --drop-path sets it).
    "ade20k-160k": dict(
        task="segmentation",
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
        mesa=0.0,
        workers=4,
        seg_crop_size=512,
        seg_scale=(2048, 512),
        seg_ratio_range=(0.5, 2.0),
        seg_cat_max_ratio=0.75,
        seg_test_mode="whole",
    ),
    # `mlla seg train --preset demo`: UperNet on a small MLLA over the generated segmentation
    # scenes (mlla.tasks.segmentation.demo), a few minutes on 2 CPU cores.
    "seg-demo": dict(
        task="segmentation",
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
        mesa=0.0,
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


def get_preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name``; raises ValueError listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
