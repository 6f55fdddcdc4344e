"""Tensor-level operators: pure functions, no parameters."""
from .rope import apply_rope_2d, rope_2d_tables

__all__ = ["apply_rope_2d", "rope_2d_tables"]
