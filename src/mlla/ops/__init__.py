"""Tensor-level operators: pure functions, no parameters."""
from .linear_attention import KERNELS, feature_map, gated_linear_attention
from .mlla_attn import attention_backend, get_attention_backend, mlla_attention, set_attention_backend
from .rope import apply_rope_2d, rope_2d_head_tables, rope_2d_tables
from .selective_scan import selective_scan

__all__ = [
    "KERNELS", "apply_rope_2d", "attention_backend", "feature_map", "gated_linear_attention", "get_attention_backend",
    "mlla_attention", "rope_2d_head_tables", "rope_2d_tables", "selective_scan", "set_attention_backend",
]
