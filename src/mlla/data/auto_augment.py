"""timm's RandAugment / AutoAugment operations, made safe for every Pillow version and image.

timm looks each operation up in ``timm.data.auto_augment.NAME_TO_OP`` when it builds an
``AugmentOp`` and calls ``op.aug_fn(img, *level_args, **kwargs)``. Two things break there:

- Posterize keeping 0 bits (``PosterizeIncreasing`` at magnitude 10, ``Posterize`` at 0; the
  ``mstd`` draw of ``rand-m9-mstd0.5`` reaches 10 about 2 % of the time): Pillow < 13 returned
  a black image, Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``.
  Our posterize returns the black image the policy means.
- Images that are not RGB: the geometric ops pass an RGB fill colour, which Pillow refuses for
  ``L``; contrast, equalize, solarize and the enhancers refuse 16-bit, float, alpha or palette
  images. Every operation therefore first brings its input to RGB with :func:`~mlla.data.images.to_rgb`.

:func:`harden_auto_augment` swaps ``aug_fn`` on the ops of a built transform, leaving timm's
tables and the level functions (the policy's meaning) as they are.
"""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image, ImageOps

from .images import to_rgb

__all__ = ["SafeAugmentFn", "harden_auto_augment", "posterize"]


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 or fewer keeps none
    (a black image), 8 or more keeps the image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


class SafeAugmentFn:
    """One of timm's ``aug_fn`` callables, run on an RGB copy of its input (picklable, so it
    works in spawned loader workers). timm's posterize is replaced by :func:`posterize`."""

    def __init__(self, fn: Callable[..., Image.Image]) -> None:
        self.fn = posterize if getattr(fn, "__name__", "") == "posterize" else fn

    def __call__(self, img: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        return self.fn(to_rgb(img), *args, **kwargs)

    def __repr__(self) -> str:
        return f"SafeAugmentFn({getattr(self.fn, '__name__', self.fn)})"


def _augment_ops(transform: Any) -> list[Any]:
    """Every object with an ``aug_fn`` inside ``transform`` (Compose, RandAugment, AutoAugment
    sub-policies, AugMix)."""
    found, stack, seen = [], [transform], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if hasattr(t, "aug_fn"):
            found.append(t)
        for attr in ("transforms", "ops", "policy"):
            children = getattr(t, attr, None)
            if isinstance(children, (list, tuple)):
                stack.extend(children)
        if isinstance(t, (list, tuple)):
            stack.extend(t)
    return found


def harden_auto_augment(transform: Any) -> int:
    """Wrap the ``aug_fn`` of every auto-augment operation in ``transform`` (in place) with
    :class:`SafeAugmentFn`. Returns how many operations were wrapped."""
    ops = _augment_ops(transform)
    for op in ops:
        if not isinstance(op.aug_fn, SafeAugmentFn):
            op.aug_fn = SafeAugmentFn(op.aug_fn)
    return len(ops)
