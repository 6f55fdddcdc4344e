"""The ablation models' token mixer: global linear attention with the paper's switches."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear_attention import feature_map, gated_linear_attention
from ..ops.rope import apply_rope_2d, rope_2d_tables
from .conv import DepthwiseConvNHWC

__all__ = ["DeltaProjection", "GatedLinearAttention"]


class DeltaProjection(nn.Module):
    """Mamba's ``Delta = softplus(x W1 W2 + bias)``, low rank ``W1: dim -> rank``.

    ``(..., dim) -> (..., out_dim)``, positive. The bias is initialised as in Mamba so that
    ``Delta`` starts log-uniform in ``[dt_min, dt_max]``; it is a separate parameter so a
    model's generic Linear initialisation leaves it alone.
    """

    def __init__(self, dim: int, out_dim: int, rank: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        dt = torch.exp(torch.rand(out_dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.up(self.down(x)) + self.bias)


class GatedLinearAttention(nn.Module):
    """Global linear attention over the raster-flattened image, with the paper's switches.

    ``x (B, H, W, C) -> (B, H, W, C)``. ``q, k`` come from a projection (``qk_dim`` channels
    each, split into ``num_heads``), ``v`` from a projection or ``x`` itself; ``phi`` = kernel.

    Args:
        dim: channels ``C``.
        num_heads: heads.
        qk_dim: total Q/K channels (default ``C``); one head with ``qk_dim=16`` is Mamba's layout.
        v_proj: project ``v`` (Transformer block) or take ``v = x`` (Mamba-style block).
        out_proj: output projection (Transformer block); a Mamba-style block has its own.
        kernel: ``phi`` (:data:`mlla.ops.KERNELS`).
        input_gate: ``v_j -> Delta_j (.) v_j``, ``Delta`` per channel from a rank ``dim/16``
            projection (Mamba's parametrisation).
        forget_gate: causal attention, the state decayed by ``exp(Delta_i A)`` per head and key
            channel (``A = -exp(A_log)`` learnable, initialised ``-1..-d`` per head as Mamba's
            states; ``Delta`` its own rank ``dim/16`` projection). Mamba decays per state *and*
            value channel; decaying per key channel keeps the chunked form in matmuls.
        causal: token ``i`` attends only to tokens ``j <= i`` of the raster scan, without a forget
            gate (the control that separates the forget gate's decay from its causal mask).
        bidirectional: with ``forget_gate``, a forward and a backward scan (reversed raster order),
            each with its own ``Delta`` projection and ``A``; the output is the mean of the two
            (each token then sees the whole image, as in vision Mambas such as Vim).
        shortcut: ``+ D (.) v``, ``D`` per channel, initialised to 1.
        normalize: attention normalisation. Without it the sums over the ``N`` tokens are
            divided by ``N`` (``q`` scaled by ``1/N``), so the output scale does not grow with
            the image size.
        pos_embed: 'lepe' (``+ DWConv3x3(v)``), 'rope' (2-d RoPE on ``phi(q), phi(k)`` in the
            numerator, the normaliser un-rotated, as MLLA) or None.
        qkv_bias: bias of the Q/K/V projection.
        chunk_size: tokens per chunk of the causal (forget gate) form.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_dim: int | None = None,
        v_proj: bool = True,
        out_proj: bool = True,
        kernel: str = "elu+1",
        input_gate: bool = False,
        forget_gate: bool = False,
        causal: bool = False,
        bidirectional: bool = False,
        shortcut: bool = False,
        normalize: bool = True,
        pos_embed: str | None = None,
        qkv_bias: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"dim {dim} and qk_dim {qk_dim} must be divisible by num_heads {num_heads}")
        if pos_embed not in (None, "lepe", "rope"):
            raise ValueError(f"pos_embed of the attention must be None, 'lepe' or 'rope', got {pos_embed!r}")
        if pos_embed == "rope" and qk_dim % 4:
            raise ValueError(f"RoPE needs qk_dim divisible by 4, got {qk_dim}")
        self.num_heads, self.qk_dim, self.v_proj = num_heads, qk_dim, v_proj
        self.kernel, self.normalize, self.pos_embed = kernel, normalize, pos_embed
        if bidirectional and not forget_gate:
            raise ValueError("bidirectional=True is a forget-gate scan in both directions; set forget_gate=True too")
        self.causal, self.chunk_size = forget_gate or causal, chunk_size
        feature_map(kernel)  # validates the name
        self.qkv = nn.Linear(dim, 2 * qk_dim + (dim if v_proj else 0), bias=qkv_bias)
        rank = max(1, math.ceil(dim / 16))
        self.input_gate = DeltaProjection(dim, dim, rank) if input_gate else None
        if forget_gate:
            self.forget_delta = DeltaProjection(dim, qk_dim, rank)
            head_dim = qk_dim // num_heads
            self.A_log = nn.Parameter(torch.arange(1, head_dim + 1, dtype=torch.float32).log().repeat(num_heads))
        else:
            self.forget_delta, self.A_log = None, None
        if bidirectional:
            self.backward_delta = DeltaProjection(dim, qk_dim, rank)
            self.A_log_backward = nn.Parameter(self.A_log.detach().clone())
        else:
            self.backward_delta, self.A_log_backward = None, None
        self.D = nn.Parameter(torch.ones(dim)) if shortcut else None
        self.lepe = DepthwiseConvNHWC(dim) if pos_embed == "lepe" else None
        self.proj = nn.Linear(dim, dim) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N, h = H * W, self.num_heads
        qkv = self.qkv(x)
        q, k = qkv[..., : self.qk_dim], qkv[..., self.qk_dim : 2 * self.qk_dim]
        v = qkv[..., 2 * self.qk_dim :] if self.v_proj else x
        kernel, q_norm, k_norm = self.kernel, None, None
        if self.pos_embed == "rope":  # rotate phi(q), phi(k); the normaliser keeps them un-rotated
            phi = feature_map(self.kernel)
            q_norm, k_norm = phi(q), phi(k)
            cos, sin = rope_2d_tables(H, W, self.qk_dim, repeats=2, device=x.device)
            q, k = apply_rope_2d(torch.cat([q_norm, k_norm], dim=-1), cos, sin).chunk(2, dim=-1)
            q_norm, k_norm = (t.reshape(B, N, h, -1) for t in (q_norm, k_norm))
            kernel = "identity"
        if not self.normalize:  # divide the sums over the N tokens by N: phi(q) / N, not phi(q / N)
            if kernel != "identity":
                phi = feature_map(kernel)
                q, k, kernel = phi(q), phi(k), "identity"
            q = q / N
        heads = lambda t: None if t is None else t.reshape(B, N, h, -1)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        gate = None if self.input_gate is None else heads(self.input_gate(x))
        shortcut = None if self.D is None else self.D.reshape(h, -1)
        args = dict(kernel=kernel, shortcut=shortcut, normalize=self.normalize, causal=self.causal, chunk_size=self.chunk_size)
        log_forget = None if self.forget_delta is None else self._log_forget(x, self.forget_delta, self.A_log)
        y = gated_linear_attention(q, k, v, input_gate=gate, log_forget=log_forget, q_norm=q_norm, k_norm=k_norm, **args)
        if self.backward_delta is not None:  # the same attention over the reversed token order
            rev = lambda t: None if t is None else t.flip(1)  # noqa: E731
            log_back = self._log_forget(x, self.backward_delta, self.A_log_backward)
            y_back = gated_linear_attention(rev(q), rev(k), rev(v), input_gate=rev(gate), log_forget=rev(log_back),
                                            q_norm=rev(q_norm), k_norm=rev(k_norm), **args)
            y = (y + y_back.flip(1)) / 2
        y = y.reshape(B, H, W, C)
        if self.lepe is not None:
            y = y + self.lepe(v.reshape(B, H, W, C))
        return self.proj(y)

    def _log_forget(self, x: torch.Tensor, delta: DeltaProjection, A_log: torch.Tensor) -> torch.Tensor:
        """``log f = Delta A``, ``(B, N, heads, qk_dim / heads)``, non-positive."""
        B, H, W, _ = x.shape
        log_f = delta(x) * -A_log.exp()
        return log_f.reshape(B, H * W, self.num_heads, -1)
