"""Any image Pillow opens -> an 8-bit RGB image with its content kept.

``Image.convert("RGB")`` is right for 8-bit modes but not for the others: it clips 16-bit and
32-bit integer pixels to 255 (a 0-65535 gradient becomes almost all white), clips float pixels,
and drops alpha, showing whatever colour happens to lie under transparent pixels.
:func:`to_rgb` rescales instead and composites transparent images over a white background.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ALPHA_BACKGROUND", "to_rgb"]

ALPHA_BACKGROUND = (255, 255, 255)  # what shows through transparent pixels

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _rescale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 255]`` (rounded, clipped)."""
    scaled = (values.astype(np.float64) - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_luminance(img: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits (``I;16*``, ``I``, ``F``) -> mode ``L``.

    16-bit pixels are divided by 257 (65535 -> 255). 32-bit integer pixels are read as 16-bit
    when they lie in ``[0, 65535]`` (what Pillow gives for most 16-bit files), else their
    ``[min, max]`` is stretched to ``[0, 255]``. Float pixels in ``[0, 1]`` are multiplied by
    255, other float ranges are stretched likewise (non-finite values count as 0).
    """
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        return Image.fromarray(_rescale_to_uint8(values, 0, 65535), "L")
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size == 0 or (values.min() >= 0 and values.max() <= 1):
            return Image.fromarray(_rescale_to_uint8(values, 0, 1), "L")
    elif values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
        return Image.fromarray(_rescale_to_uint8(values, 0, 65535), "L")
    return Image.fromarray(_rescale_to_uint8(values, float(values.min()), float(values.max())), "L")


def _composite(img: Image.Image) -> Image.Image:
    """An image with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency, ...) over
    :data:`ALPHA_BACKGROUND`, as RGB."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as mode ``RGB``, 8 bits per channel, content kept.

    - ``RGB``: returned as it is.
    - ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ``P`` without transparency: Pillow's conversion
      (palette expanded, ``1`` as 0/255).
    - ``I;16``, ``I``, ``F`` (16-bit, 32-bit integer, float): rescaled to 8 bits, not clipped
      (see :func:`_to_luminance`), then grey RGB.
    - ``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``, ``P`` with a transparent colour: composited over
      :data:`ALPHA_BACKGROUND` (white).

    Raises ``ValueError`` for a mode Pillow cannot convert to RGB (e.g. ``LAB``).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _to_luminance(img).convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite(img)
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a mode {mode} image to RGB ({e})") from e
