"""Tensor-level operators: pure functions, no parameters."""
from .linear_attention import KERNELS, feature_map, gated_linear_attention
from .rope import apply_rope_2d, rope_2d_head_tables, rope_2d_tables
from .selective_scan import selective_scan

__all__ = ["KERNELS", "apply_rope_2d", "feature_map", "gated_linear_attention", "rope_2d_head_tables", "rope_2d_tables", "selective_scan"]
