"""MLLA's token mixer: non-causal linear attention with RoPE and LePE (SPEC section 3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv import DepthwiseConv

__all__ = ["MllaLinearAttention"]

_LOG2_E = math.log2(math.e)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1 = exp(min(x, 0)) + max(x, 0)`` (on CPUs ``F.elu`` goes through a slow
    ``expm1``, and ``exp2`` is faster than ``exp``)."""
    return torch.exp2(x.clamp_max(0.0) * _LOG2_E) + x.clamp_min(0.0)


def _elu_plus_one_(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_elu_plus_one` in place on ``x``; with a ``scratch`` tensor of ``x``'s shape it
    allocates nothing."""
    positive = torch.clamp_min(x, 0.0, out=scratch) if scratch is not None else x.clamp_min(0.0)
    return x.clamp_max_(0.0).mul_(_LOG2_E).exp2_().add_(positive)


class MllaLinearAttention(nn.Module):
    """Multi-head linear attention over all ``N = H * W`` tokens, ``O(N)`` in time and memory.

    ``q, k = ELU(x Wqk) + 1`` (kernel), ``v = x``. RoPE rotates ``q`` and ``k`` for the
    numerator, the normaliser uses the un-rotated ones; per head::

        out_i = qr_i (sum_j kr_j^T v_j / N) / (q_i . mean_j k_j + 1e-6)

    and the LePE (a depthwise 3x3 convolution of ``v``) is added. This is
    ``mlla.ops.gated_linear_attention(qr, kr, v, q_norm=q, k_norm=k)`` (a test checks it), written
    out for speed: the rotation writes its output straight into the head-major layout of the
    matmuls, each head's channel pairs ``(a_p, b_p)`` de-interleaved (``[a_0 .. a_{d/2-1}, b_0 ..
    b_{d/2-1}]``), which changes no dot product within a head.
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
        B, _, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view
        qk = _elu_plus_one(self.qk(tokens)).reshape(B, H * W, 2, h, d)
        q, k = qk.unbind(2)  # (B, N, h, d)
        z = ((q * k.mean(dim=1, keepdim=True)).sum(-1) + self.eps).reciprocal()  # (B, N, h)

        # RoPE on pairs (a, b) -> (a cos - b sin, a sin + b cos), written head-major and de-interleaved.
        src = qk.permute(2, 0, 3, 1, 4)  # (2, B, h, N, d) view
        a, b = src[..., 0::2], src[..., 1::2]
        cos, sin = rope
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(qk.dtype)
        q_rot, k_rot = rot.unbind(0)  # (B, h, N, d)

        v = tokens.reshape(B, H * W, h, d).transpose(1, 2)  # (B, h, N, d)
        kv = (k_rot.transpose(-1, -2) @ v) / (H * W)  # (B, h, d, d)
        out = (q_rot @ kv) * z.transpose(1, 2).unsqueeze(-1)  # (B, h, N, d)
        return self.lepe(x).permute(0, 2, 3, 1) + out.transpose(1, 2).reshape(B, H, W, h * d)

    def forward_inplace(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` for the fused inference path of :class:`MllaBlock` (see
        :meth:`MllaBlock.forward_fused`): no autograd, works in place on fresh tensors, reads the
        ``qk`` projection's rows with each head's channel pairs de-interleaved, so that the pair
        swap is two contiguous slices, and uses the RoPE output buffer as scratch space before it
        is written (fewer large allocations)."""
        B, C, H, W = x.shape
        N, h, d = H * W, self.num_heads, self.head_dim
        image, x = x, x.permute(0, 2, 3, 1)  # tokens (B, H, W, C), a view
        qk = F.linear(x, *self._deinterleaved_qk())  # (B, H, W, 2C), pairs de-interleaved
        cos, sin = rope
        rot = torch.empty((2, B, h, N, d), dtype=torch.promote_types(qk.dtype, cos.dtype), device=x.device)
        scratch = rot.view(qk.shape) if rot.dtype == qk.dtype else None
        qk = _elu_plus_one_(qk, scratch=scratch).view(B, N, 2, h, d)
        q, k = qk.unbind(2)  # (B, N, h, d) views

        q_dot_kmean = q * k.mean(dim=1, keepdim=True) if scratch is None else torch.mul(
            q, k.mean(dim=1, keepdim=True), out=scratch.view(-1)[: q.numel()].view(q.shape)
        )
        z = q_dot_kmean.sum(-1).add_(self.eps).reciprocal_()  # (B, N, h)

        src = qk.permute(2, 0, 3, 1, 4)  # (2, B, h, N, d) view
        a, b = src[..., : d // 2], src[..., d // 2:]
        rot_a, rot_b = rot[..., : d // 2], rot[..., d // 2:]
        torch.mul(a, cos, out=rot_a).addcmul_(b, sin, value=-1.0)
        torch.mul(a, sin, out=rot_b).addcmul_(b, cos)
        q_rot, k_rot = rot.to(qk.dtype).unbind(0)  # (B, h, N, d)

        v = x.reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        kv = (k_rot.transpose(-1, -2) @ v) / N  # (B, h, d, d)
        out = (q_rot @ kv).mul_(z.transpose(1, 2).unsqueeze(-1))  # (B, h, N, d)
        lepe = self.lepe(image).permute(0, 2, 3, 1)  # (B, H, W, C), fresh: add the attention into it
        lepe.view(B, N, h, d).transpose(1, 2).add_(out)
        return lepe

    def _deinterleaved_qk(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q/k projection with each head's channel pairs de-interleaved: copies."""
        h, d = self.num_heads, self.head_dim

        def reorder(t: torch.Tensor) -> torch.Tensor:  # rows (2, h, d/2, 2) -> (2, h, 2, d/2)
            return t.reshape(2, h, d // 2, 2, *t.shape[1:]).transpose(2, 3).reshape(t.shape)

        bias = self.qk.bias
        return reorder(self.qk.weight), None if bias is None else reorder(bias)
