"""The MLLA block: linear attention inside Mamba's block design (SPEC section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .attention import MllaLinearAttention
from .conv import DepthwiseConv, DepthwiseConvNHWC, timm_factory_kwargs

__all__ = ["INFERENCE_CHUNK_BYTES", "MllaBlock", "tracing"]

#: Size of the widest activation chunk (the MLP hidden layer) of the fused inference path.
INFERENCE_CHUNK_BYTES = 4 << 20


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def tracing() -> bool:
    """Under ``torch.compile``, ``torch.export`` (strict or not) or the TorchScript tracer: a context, not a tensor."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class MllaBlock(nn.Module):
    """Mamba-like linear attention block on channels-last tokens ``(B, H, W, C)``.

    ::

        x = x + CPE(x)                               # one depthwise conv, identity in its kernel
        y = LN(x); y, g = in_proj(y)                 # input and gate projections, one matmul
        y = LinearAttention(SiLU(DWConv(y)))
        x = x + DropPath(out_proj(y * SiLU(g)))
        x = x + CPE(x)
        x = x + DropPath(MLP(LN(x)))

    ``forward`` calls every submodule, so hooks, adapters, quantisation and tracing see them all.
    ``fused_inference = True`` (set by ``MLLA.fuse()``) selects :meth:`forward_fused` instead, an
    inference-only path in place and in token chunks; ``torch.compile``, ``torch.export`` and the
    TorchScript tracer keep the plain path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.cpe1 = DepthwiseConvNHWC(dim, residual=True, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.in_proj = nn.Linear(dim, 2 * dim, **dd)  # [input projection | gate projection]
        self.dwconv = DepthwiseConv(dim, **dd)
        self.attn = MllaLinearAttention(dim, num_heads, qkv_bias=qkv_bias, **dd)
        self.out_proj = nn.Linear(dim, dim, **dd)
        self.cpe2 = DepthwiseConvNHWC(dim, residual=True, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **timm_factory_kwargs(device, dtype))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.fused_inference = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: (B, H, W, C)``, ``rope``: RoPE tables (see ``MllaLinearAttention``) -> ``(B, H, W, C)``."""
        if self.fused_inference and not tracing():
            return self.forward_fused(x, rope)
        x = self.cpe1(x)
        y, gate = self.in_proj(self.norm1(x)).chunk(2, dim=-1)
        y = self.attn(F.silu(self.dwconv(y.contiguous().permute(0, 3, 1, 2))), rope)
        x = x + self.drop_path(self.out_proj(y * F.silu(gate)))
        x = self.cpe2(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_fused(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` for eager inference: in place, the token-wise parts in chunks of tokens.

        The norms, projections and MLP act on each token alone, so they run on chunks of
        about :data:`INFERENCE_CHUNK_BYTES` of activations and add their results into the
        residual stream in place. Large activations (the ``4 C`` MLP hidden layer above all)
        are then never materialised whole: they stay in cache and are not re-allocated from
        the operating system at every call, which on CPUs costs as much as the arithmetic at
        high resolution. It reads the linear layers' weights directly, so it refuses (with a
        :class:`RuntimeError`) where that would change what the model computes: with autograd
        or autocast enabled, in training with stochastic depth, or when a submodule it reads has
        been replaced (an adapter, a quantised layer) or carries hooks.
        """
        self._check_fused_inference(x.device.type)
        x = self.cpe1(x).contiguous()  # fresh: updated in place below
        B, H, W, C = x.shape
        tokens = x.view(-1, C)
        step = max(1, INFERENCE_CHUNK_BYTES // (4 * C * x.element_size()))
        # The input and gate projections go to separate contiguous tensors (no copy before dwconv).
        y, gate = torch.empty((2, *tokens.shape), dtype=x.dtype, device=x.device)
        (w_y, w_gate), (b_y, b_gate) = self.in_proj.weight.chunk(2), self.in_proj.bias.chunk(2)
        for t, y_t, gate_t in zip(tokens.split(step), y.split(step), gate.split(step)):
            normed = self.norm1(t)
            torch.addmm(b_y, normed, w_y.t(), out=y_t)
            torch.addmm(b_gate, normed, w_gate.t(), out=gate_t)
        y = self.attn.forward_inplace(F.silu(self.dwconv(y.view(B, H, W, C).permute(0, 3, 1, 2)), inplace=True), rope)
        y = y.reshape(-1, C)
        for t, y_t, gate_t in zip(tokens.split(step), y.split(step), gate.split(step)):
            y_t.mul_(F.silu(gate_t, inplace=True))
            t.add_(self.out_proj.bias).addmm_(y_t, self.out_proj.weight.t())
        x = self.cpe2(x).contiguous()
        tokens = x.view(-1, C)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2  # the MLP is fc1 -> GELU -> fc2 (no dropout, no norm)
        for t in tokens.split(step):
            hidden = fc1(self.norm2(t))
            torch.ops.aten.gelu_(hidden)
            t.add_(fc2.bias).addmm_(hidden, fc2.weight.t())
        return x

    def _check_fused_inference(self, device_type: str) -> None:
        """Raise where :meth:`forward_fused` would compute something else than :meth:`forward`."""
        how = "call model.set_fused_inference(False) (model.model.set_fused_inference(False) for features_only)"
        if torch.is_grad_enabled():
            raise RuntimeError(
                "MllaBlock.fused_inference (set by model.fuse()) is an inference path without autograd: run the "
                f"model under torch.no_grad() or torch.inference_mode(), or for training {how}"
            )
        if _autocast_enabled(device_type):
            raise RuntimeError(f"MllaBlock.fused_inference (set by model.fuse()) does not support autocast: {how}")
        if self.training and not isinstance(self.drop_path, nn.Identity):
            raise RuntimeError(f"MllaBlock.fused_inference (set by model.fuse()) has no stochastic depth: call model.eval(), or {how}")
        # The submodules it does not call once as modules (it reads weights, or runs them on chunks).
        expected = {
            "norm1": None, "in_proj": nn.Linear, "attn": MllaLinearAttention, "attn.qk": nn.Linear,
            "out_proj": nn.Linear, "norm2": None, "mlp": Mlp, "mlp.fc1": nn.Linear, "mlp.act": nn.GELU,
            "mlp.fc2": nn.Linear,
        }
        for name, cls in expected.items():
            module = self.get_submodule(name)
            if cls is not None and type(module) is not cls:
                raise RuntimeError(
                    f"MllaBlock.fused_inference (set by model.fuse()) reads the weights of {name} directly, which is now "
                    f"a {type(module).__name__} (not {cls.__name__}); {how}"
                )
            if module._forward_hooks or module._forward_pre_hooks:
                raise RuntimeError(
                    f"MllaBlock.fused_inference (set by model.fuse()) does not call {name} once as a module, so its "
                    f"hooks would not see what they expect; {how}"
                )
        if not isinstance(self.mlp.norm, nn.Identity) or self.mlp.drop1.p or self.mlp.drop2.p:
            raise RuntimeError(f"MllaBlock.fused_inference needs the MLP as fc1 -> GELU -> fc2; {how}")
