"""Image transforms, built by timm's ``create_transform`` from a training configuration."""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from .auto_augment import harden_auto_augment
from .images import to_rgb

__all__ = ["ToRGB", "build_transform"]


class ToRGB:
    """Transform: any PIL image -> 8-bit RGB with its content kept (:func:`~mlla.data.images.to_rgb`)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(
    model: nn.Module,
    *,
    is_training: bool,
    img_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    no_aug: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    aa: str | None = None,
    color_jitter: float = 0.0,
    reprob: float = 0.0,
    remode: str = "pixel",
) -> Callable[[Any], Any]:
    """PIL image -> normalised tensor ``(3, img_size, img_size)``.

    Training: random resized crop, flip, RandAugment (``aa``, e.g. ``rand-m9-mstd0.5-inc1``),
    colour jitter (only without ``aa``, as in timm) and random erasing (``reprob``); with
    ``no_aug`` the evaluation transform is used for training too. Evaluation: resize to
    ``img_size / crop_pct`` and centre-crop. Mean and std come from the model's config.
    Both start with :class:`ToRGB` (16-bit, palette, alpha, CMYK images keep their content), and
    the auto-augment operations are made safe for every Pillow version
    (:func:`~mlla.data.auto_augment.harden_auto_augment`).
    """
    data_cfg = resolve_data_config(
        dict(input_size=(3, img_size, img_size), crop_pct=crop_pct, interpolation=interpolation), model=model
    )
    if not is_training or no_aug:
        transform = create_transform(**data_cfg, is_training=False)
    else:
        transform = create_transform(
            **data_cfg,
            is_training=True,
            scale=tuple(scale),
            hflip=hflip,
            auto_augment=aa,
            color_jitter=color_jitter,
            re_prob=reprob,
            re_mode=remode,
        )
    harden_auto_augment(transform)
    transform.transforms.insert(0, ToRGB())
    return transform
