"""Settings of the classification task: the shared run settings plus input size, augmentation,
Mixup/CutMix, label smoothing and MESA; the paper's ImageNet-1K recipe per model size (SPEC
section 4), a fine-tuning preset and the built-in demo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...engine.config import TrainConfig, setting

__all__ = ["ClassificationConfig", "PRESETS", "default_preset"]

_AUG = "augmentation and regularisation"


@dataclass
class ClassificationConfig(TrainConfig):
    """:class:`~mlla.engine.config.TrainConfig` and what classification adds."""

    task: str = setting("classification", group="run", flag=False)
    initial_checkpoint_ema: bool = setting(False, "take the EMA weights of --initial-checkpoint instead", group="model")
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory)", group="model")
    img_size: int = setting(224, "input size (at least 32: the model downsamples by 32)", group="data")
    no_aug: bool = setting(False, "no augmentation at all (the evaluation transform)", group=_AUG)
    scale: tuple[float, float] = setting((0.08, 1.0), "random resized crop area range, e.g. 0.08,1", group=_AUG)
    hflip: float = setting(0.5, "horizontal flip probability", group=_AUG)
    aa: str | None = setting("rand-m9-mstd0.5-inc1", "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (none: off)", group=_AUG)
    color_jitter: float = setting(0.4, "colour jitter strength", group=_AUG)
    reprob: float = setting(0.25, "random erasing probability", group=_AUG)
    remode: str = setting("pixel", "random erasing mode", group=_AUG)
    mixup: float = setting(0.8, "Mixup alpha (0: off)", group=_AUG)
    cutmix: float = setting(1.0, "CutMix alpha (0: off)", group=_AUG)
    mixup_prob: float = setting(1.0, "probability of Mixup or CutMix per batch", group=_AUG)
    mixup_switch_prob: float = setting(0.5, "probability of CutMix instead of Mixup", group=_AUG)
    smoothing: float = setting(0.1, "label smoothing", group=_AUG)
    interpolation: str = setting("bicubic", "resize interpolation", group=_AUG)
    crop_pct: float = setting(0.875, "evaluation centre crop fraction", group=_AUG)
    mesa: float = setting(0.0, "MESA weight: soft-target loss against the EMA model's predictions (0: off)", group=_AUG)
    mesa_start: float = setting(0.25, "fraction of the epochs before MESA starts", group=_AUG)

    def unused(self) -> set[str]:
        unused = super().unused()
        if not self.mesa:
            unused.add("mesa_start")
        if self.no_aug or not (self.mixup or self.cutmix):
            unused |= {"mixup_prob", "mixup_switch_prob"}
        if self.no_aug or not self.reprob:
            unused.add("remode")
        return unused


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
}


def default_preset(given: dict[str, Any]) -> str | None:
    """Without --preset and --config: the demo without data and model, else the model's own recipe if it has one."""
    if "data_dir" not in given and "model" not in given:
        return "demo"
    return given.get("model") if given.get("model") in PRESETS else None
