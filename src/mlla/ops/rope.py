"""Two-dimensional rotary position embedding (RoPE), real-valued.

For an ``H x W`` grid and ``C`` channels, ``m = C / 4`` frequencies
``theta_j = base ** (-j / m)`` are used. Token ``(r, c)`` gets ``C / 2`` angles:
``[r * theta_0 .. r * theta_{m-1}, c * theta_0 .. c * theta_{m-1}]``, and angle ``p`` rotates
the channel pair ``(2p, 2p + 1)``: ``(a, b) -> (a cos - b sin, a sin + b cos)``.

The tables are computed for the actual grid (any ``H``, ``W``), in float32 by default or in the
dtype asked for (a float64 model gets float64 tables: angles from float32 frequencies would cost
it about 1e-10), without complex numbers, so the rotation exports to ONNX and compiles without
graph breaks.
"""
from __future__ import annotations

import torch

__all__ = ["apply_rope_2d", "rope_2d_head_tables", "rope_2d_tables"]


def _frequencies(num_freqs: int, base: float, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    """``theta_j = base ** (-j / m)`` for ``j < m = num_freqs``, in ``dtype``."""
    return base ** (-torch.arange(num_freqs, device=device, dtype=dtype) / num_freqs)


def rope_2d_tables(
    height: int,
    width: int,
    dim: int,
    *,
    base: float = 10000.0,
    repeats: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and signed-sine tables for :func:`apply_rope_2d`.

    Args:
        height, width: token grid size.
        dim: channels ``C`` to rotate (a multiple of 4).
        base: frequency base.
        repeats: tile the tables ``repeats`` times along channels, to rotate several tensors
            concatenated on the channel axis (e.g. ``[q, k]``) in one call.
        device, dtype: device and dtype of the tables (computed in that dtype).

    Returns:
        ``(cos, sin)``, each of shape ``(H, W, repeats * C)``. ``cos`` holds each cosine
        twice (for both members of a pair); ``sin`` holds ``-sin`` at even and ``+sin`` at odd
        channels, so that the rotation is ``x * cos + swap_pairs(x) * sin``.
    """
    if dim % 4:
        raise ValueError(f"RoPE-2d needs a channel count divisible by 4, got {dim}")
    num_freqs = dim // 4
    theta = _frequencies(num_freqs, base, device, dtype)
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    row_angles = (rows[:, None] * theta[None, :])[:, None, :].expand(height, width, num_freqs)
    col_angles = (cols[:, None] * theta[None, :])[None, :, :].expand(height, width, num_freqs)
    angles = torch.cat([row_angles, col_angles], dim=-1)  # (H, W, C/2)
    cos = angles.cos().repeat_interleave(2, dim=-1)  # (H, W, C)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)  # (H, W, C)
    if repeats > 1:
        cos, sin = cos.repeat(1, 1, repeats), sin.repeat(1, 1, repeats)
    return cos, sin


def rope_2d_head_tables(
    height: int,
    width: int,
    dim: int,
    num_heads: int,
    *,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The angles of :func:`rope_2d_tables`, one per channel pair, laid out head-major.

    Returns ``(cos, sin)``, each in ``dtype`` (computed in it) of shape ``(num_heads, H * W, C / num_heads / 2)``:
    entry ``[i, n, p]`` is the cosine / sine of token ``n``'s angle for pair ``p`` of head ``i``
    (channels ``(2p, 2p + 1)`` of the head). Cosines and sines are taken of the ``H + W``
    distinct rows and columns only, then spread over the grid in one pass.

    Under ``torch.compile`` the tables come from one opaque operator, ``mlla::rope_2d_head_tables``:
    inductor inlines cheap pointwise producers into their consumers, and would otherwise recompute
    the cosines and sines for every element the rotation writes (every image of the batch, q and k).
    ``torch.export`` gets the plain tensor computation, which ONNX and other runtimes understand.
    """
    if dim % 4 or dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"RoPE-2d by heads needs C divisible by 4 and into {num_heads} heads of even size, got C={dim}")
    if _rope_tables_op is not None and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _rope_tables_op(height, width, dim, num_heads, float(base), torch.device(device or "cpu"), dtype)
    return _head_tables(height, width, dim, num_heads, base, device, dtype)


def _head_tables(
    height: int, width: int, dim: int, num_heads: int, base: float, device: torch.device | str | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_freqs, pairs_per_head = dim // 4, dim // num_heads // 2
    theta = _frequencies(num_freqs, base, device, dtype)
    # Pair q of the C / 2 uses the row for q < C / 4 and the column otherwise, frequency q mod C / 4.
    pair = torch.arange(dim // 2, device=device).view(num_heads, 1, 1, pairs_per_head)
    uses_row = pair < num_freqs
    theta = theta[pair % num_freqs]  # (h, 1, 1, d/2)
    row_angles = torch.arange(height, device=device, dtype=dtype).view(1, -1, 1, 1) * theta  # (h, H, 1, d/2)
    col_angles = torch.arange(width, device=device, dtype=dtype).view(1, 1, -1, 1) * theta  # (h, 1, W, d/2)

    def spread(fn) -> torch.Tensor:  # (h, H, W, d/2) -> (h, N, d/2)
        return torch.where(uses_row, fn(row_angles), fn(col_angles)).flatten(1, 2)

    return spread(torch.cos), spread(torch.sin)


_rope_tables_op = None
if hasattr(torch.library, "custom_op"):  # torch >= 2.4

    @torch.library.custom_op("mlla::rope_2d_head_tables", mutates_args=())
    def _rope_tables_op(
        height: int, width: int, dim: int, num_heads: int, base: float, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _head_tables(height, width, dim, num_heads, base, device, dtype)

    @_rope_tables_op.register_fake
    def _(height: int, width: int, dim: int, num_heads: int, base: float, device: torch.device, dtype: torch.dtype):
        shape = (num_heads, height * width, dim // num_heads // 2)
        return torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` by the angles of its grid position.

    Args:
        x: ``(B, H, W, C)`` (any dtype; the rotation runs in the tables' dtype, at least float32).
        cos, sin: tables of shape ``(H, W, C)`` from :func:`rope_2d_tables`.

    Returns:
        Rotated tensor, shape and dtype of ``x``.
    """
    xf = x.to(torch.promote_types(cos.dtype, torch.float32))
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (a, b) -> (b, a)
    return (xf * cos + swapped * sin).to(x.dtype)
