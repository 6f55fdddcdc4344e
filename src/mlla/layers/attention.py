"""MLLA's token mixer: non-causal linear attention with RoPE and LePE (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.mlla_attn import add_mlla_attention_, mlla_attention, uses_kernel
from .conv import DepthwiseConv

__all__ = ["MllaLinearAttention", "follows_attention_backend"]


class MllaLinearAttention(nn.Module):
    """Multi-head linear attention over all ``N = H * W`` tokens, ``O(N)`` in time and memory.

    ``q, k = ELU(x Wqk) + 1`` (kernel), ``v = x``. RoPE rotates ``q`` and ``k`` for the
    numerator, the normaliser uses the un-rotated ones; per head::

        out_i = qr_i (sum_j kr_j^T v_j / N) / (q_i . mean_j k_j + 1e-6)

    (:func:`mlla.ops.mlla_attention`, whose backend switch may run it as a fused Triton kernel),
    and the LePE (a depthwise 3x3 convolution of ``v``) is added. The layer holds the parameters.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into num_heads {num_heads} heads of even size")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.lepe = DepthwiseConv(dim, **dd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: (B, C, H, W)`` in channels-last memory, ``rope``: tables of
        :func:`mlla.ops.rope_2d_head_tables` -> ``(B, H, W, C)``.

        ``x`` comes in the layout of the depthwise convolution before it, and the LePE convolution
        takes it as it is; the token view ``(B, H, W, C)`` is a permute of the same memory. (Handing
        the LePE a permute of a permute makes inductor lay the activation out transposed and copy it
        twice.)
        """
        B, C, H, W = x.shape
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view
        qk = self.qk(tokens).reshape(B, H * W, 2, self.num_heads, self.head_dim)
        cos, sin = rope
        out = mlla_attention(qk, tokens.reshape(B, H * W, self.num_heads, self.head_dim), cos, sin, eps=self.eps, width=W)
        return self.lepe(x).permute(0, 2, 3, 1) + out.reshape(B, H, W, C)

    def forward_inplace(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` for the fused inference path of :class:`MllaBlock` (see
        :meth:`MllaBlock.forward_fused`): no autograd, in place on fresh tensors
        (:func:`mlla.ops.mlla_attn.add_mlla_attention_`), with the ``qk`` projection's rows
        read with each head's channel pairs de-interleaved. Where the attention backend selects the
        fused kernel (see :mod:`mlla.ops.mlla_attn.backend`), :meth:`forward`, which runs it."""
        B, C, H, W = x.shape
        N, h, d = H * W, self.num_heads, self.head_dim
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view
        v = tokens.reshape(B, N, h, d)
        if uses_kernel(x, x, rope[0]):  # q, k and v all in x's dtype here (no autocast on this path)
            return self.forward(x, rope)
        qk = F.linear(tokens, *self._deinterleaved_qk())  # (B, H, W, 2C), pairs de-interleaved
        lepe = self.lepe(x).permute(0, 2, 3, 1)  # (B, H, W, C), fresh: add the attention into it
        cos, sin = rope
        add_mlla_attention_(lepe.view(B, N, h, d), qk.view(B, N, 2, h, d), v, cos, sin, eps=self.eps)
        return lepe

    def _deinterleaved_qk(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q/k projection with each head's channel pairs de-interleaved: copies."""
        h, d = self.num_heads, self.head_dim

        def reorder(t: torch.Tensor) -> torch.Tensor:  # rows (2, h, d/2, 2) -> (2, h, 2, d/2)
            return t.reshape(2, h, d // 2, 2, *t.shape[1:]).transpose(2, 3).reshape(t.shape)

        bias = self.qk.bias
        return reorder(self.qk.weight), None if bias is None else reorder(bias)


def follows_attention_backend(model: nn.Module) -> bool:
    """Whether ``model`` holds an :class:`MllaLinearAttention`, the layer whose computation
    :func:`mlla.ops.set_attention_backend` chooses (MLLA models and backbones; not the ablation models)."""
    return any(isinstance(m, MllaLinearAttention) for m in model.modules())
