"""The paper's ablation models (Tables 1-2): from linear attention towards Mamba, one switch at a time.

Baseline: the Swin-T macro design (patch 4, ``C = 96``, depths 2-2-6-2, heads 3-6-12-24, MLP
ratio 4, Swin patch merging) with its window softmax attention replaced by *global* non-causal
linear attention (kernel ELU+1). Each registered variant changes one thing (SPEC section 2):

================================  ============================================================
``ablation_baseline``             the baseline
``ablation_input_gate``           ``v_j -> Delta_j (.) v_j``, ``Delta`` from a rank ``C/16`` projection
``ablation_forget_gate``          state decayed by ``exp(Delta_i A)``: causal over the raster scan
``ablation_shortcut``             ``+ D (.) v``
``ablation_no_norm``              no attention normalisation
``ablation_single_head``          one head with Q/K size 16
``ablation_block_all``            Mamba-style block (E=2) replaces attention + MLP
``ablation_block_sub``            Mamba-style block (E=1) replaces the attention, MLP kept
``ablation_ape|lepe|cpe|rope``    a positional encoding instead of the forget gate (Table 2)
================================  ============================================================

Controls for what a variant changes besides its design (not in the paper):

================================  ============================================================
``ablation_causal``               the forget gate's causal mask alone (no decay)
``ablation_forget_gate_bidir``    forget gate in a forward and a backward scan (as vision Mambas)
``ablation_single_head_full_qk``  one head, Q/K keeping the full width ``C``
``ablation_block_all_matched``    block design (all) with ``E = 1.8125``: the baseline's parameters
================================  ============================================================

All are :class:`LinearSwin` built on :func:`mlla.ops.gated_linear_attention`; any input size
works (the APE is resampled, RoPE is computed for the actual grid). The choices the paper leaves
open are documented on :class:`mlla.layers.gated_attention.GatedLinearAttention` and the blocks.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn

from ..layers.ablation_blocks import LinearAttentionBlock, MambaStyleBlock
from .registry import PAPER_RESULTS

__all__ = ["ABLATION_VARIANTS", "LinearSwin", "variant_switches"]

_POS_EMBEDS = (None, "ape", "lepe", "cpe", "rope")


class LinearSwin(nn.Module):
    """Swin-T macro design with global linear attention and the paper's switches.

    Input ``(B, in_chans, H, W)`` of any size; ``forward_features`` returns channels-last
    ``(B, ceil(H / 32), ceil(W / 32), 8 C)``, ``forward`` the logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: int | Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        block: str = "transformer",
        expand: float = 2.0,
        with_mlp: bool = False,
        pos_embed: str | None = None,
        img_size: int | tuple[int, int] = 224,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        **attn_kwargs: Any,
    ) -> None:
        """
        Args:
            in_chans, num_classes, global_pool: as in timm.
            embed_dim: channels ``C`` of the first stage; stage ``i`` has ``C * 2**i``.
            depths, num_heads: blocks and attention heads per stage (one ``num_heads`` for all stages).
            mlp_ratio: MLP hidden width over block width.
            block: 'transformer' (:class:`LinearAttentionBlock`) or 'mamba' (:class:`MambaStyleBlock`).
            expand, with_mlp: expansion ``E`` and MLP of the 'mamba' block.
            pos_embed: None, 'ape', 'lepe', 'cpe' or 'rope' ('transformer' block only).
            img_size: the size the APE tables are made for (other sizes resample them).
            drop_rate, drop_path_rate: dropout before the classifier; stochastic depth, rising
                linearly over the blocks up to this value.
            attn_kwargs: switches of :class:`mlla.layers.gated_attention.GatedLinearAttention`:
                ``input_gate``, ``forget_gate``, ``causal``, ``bidirectional``, ``shortcut``,
                ``normalize``, ``qk_dim``, ``kernel``, ``chunk_size``.
        """
        super().__init__()
        num_heads = (num_heads,) * len(depths) if isinstance(num_heads, int) else tuple(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        if block not in ("transformer", "mamba"):
            raise ValueError(f"block must be 'transformer' or 'mamba', got {block!r}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        if pos_embed is not None and block != "transformer":
            raise ValueError("positional encodings are variants of the 'transformer' block; use block='transformer'")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=nn.LayerNorm, output_fmt="NHWC", dynamic_img_pad=True,
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.Sequential()
        self.feature_info = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            grid = tuple(math.ceil(s / 4 / 2**i) for s in img_size)
            stage = nn.Sequential()
            if i > 0:
                stage.add_module("downsample", PatchMerging(dims[i - 1], dim))
            for j in range(depth):
                drop_path = dpr[sum(depths[:i]) + j]
                if block == "transformer":
                    stage.add_module(str(j), LinearAttentionBlock(
                        dim, heads, mlp_ratio=mlp_ratio, drop_path=drop_path, pos_embed=pos_embed,
                        grid_size=grid, **attn_kwargs,
                    ))
                else:
                    stage.add_module(str(j), MambaStyleBlock(
                        dim, heads, expand=expand, with_mlp=with_mlp, mlp_ratio=mlp_ratio,
                        drop_path=drop_path, **attn_kwargs,
                    ))
            self.stages.append(stage)
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, ceil(H / 32), ceil(W / 32), num_features)``, normalised."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                f"add a batch dimension with x[None] or give NCHW rather than NHWC input"
            )
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool channels-last features and classify; ``pre_logits`` returns pooled features."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2405.16605",
        "paper_name": "Demystify Mamba in Vision: A Linear Attention Perspective",
        **kwargs,
    }


# Each variant: the baseline's arguments it changes.
_VARIANTS: dict[str, dict[str, Any]] = {
    "ablation_baseline": {},
    "ablation_input_gate": dict(input_gate=True),
    "ablation_forget_gate": dict(forget_gate=True),
    "ablation_shortcut": dict(shortcut=True),
    "ablation_no_norm": dict(normalize=False),
    "ablation_single_head": dict(num_heads=1, qk_dim=16),
    "ablation_block_all": dict(block="mamba", expand=2.0, with_mlp=False),
    "ablation_block_sub": dict(block="mamba", expand=1.0, with_mlp=True),
    "ablation_ape": dict(pos_embed="ape"),
    "ablation_lepe": dict(pos_embed="lepe"),
    "ablation_cpe": dict(pos_embed="cpe"),
    "ablation_rope": dict(pos_embed="rope"),
    "ablation_causal": dict(causal=True),
    "ablation_forget_gate_bidir": dict(forget_gate=True, bidirectional=True),
    "ablation_single_head_full_qk": dict(num_heads=1),
    "ablation_block_all_matched": dict(block="mamba", expand=1.8125, with_mlp=False),
}

#: The registered variants: the paper's (Table 1, then Table 2), then the controls.
ABLATION_VARIANTS: tuple[str, ...] = tuple(_VARIANTS)


def variant_switches(name: str) -> dict[str, Any]:
    """The model arguments by which ablation variant ``name`` differs from the baseline (a copy)."""
    if name not in _VARIANTS:
        raise ValueError(f"{name!r} is not an ablation variant; choose from {', '.join(_VARIANTS)}")
    return dict(_VARIANTS[name])


default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg() for name in _VARIANTS})

# Paper Table 1 (params M, FLOPs G as multiply-accumulates, top-1 %) and Table 2 (params, top-1).
PAPER_RESULTS.update({
    "ablation_baseline": dict(params_m=28.0, gmacs=4.5, top1=77.6),
    "ablation_input_gate": dict(params_m=29.0, gmacs=4.5, top1=77.8),
    "ablation_forget_gate": dict(params_m=29.0, gmacs=4.8, top1=78.4),
    "ablation_shortcut": dict(params_m=28.0, gmacs=4.5, top1=77.8),
    "ablation_no_norm": dict(params_m=28.0, gmacs=4.5, top1=72.4),
    "ablation_single_head": dict(params_m=24.0, gmacs=3.9, top1=73.5),
    "ablation_block_all": dict(params_m=28.0, gmacs=4.7, top1=79.4),
    "ablation_block_sub": dict(params_m=31.0, gmacs=4.8, top1=80.9),
    "ablation_ape": dict(params_m=30.0, top1=80.0),
    "ablation_lepe": dict(params_m=28.0, top1=81.6),
    "ablation_cpe": dict(params_m=28.0, top1=81.7),
    "ablation_rope": dict(params_m=28.0, top1=80.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} is a classifier only; use forward_features for the last stage's features")
    return build_model_with_cfg(LinearSwin, variant, pretrained, **dict(_VARIANTS[variant], **kwargs))


@register_model
def ablation_baseline(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline: Swin-T macro design, global non-causal linear attention (ELU+1 kernel)."""
    return _create("ablation_baseline", pretrained, **kwargs)


@register_model
def ablation_input_gate(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + input gate: ``v_j -> Delta_j (.) v_j`` (Mamba's ``Delta``, rank C/16)."""
    return _create("ablation_input_gate", pretrained, **kwargs)


@register_model
def ablation_forget_gate(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + forget gate: causal attention over the raster-flattened image, the state
    decayed by ``exp(Delta_i A)`` per head and key channel (chunked form)."""
    return _create("ablation_forget_gate", pretrained, **kwargs)


@register_model
def ablation_shortcut(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + shortcut ``D (.) v`` (learnable ``D`` per channel)."""
    return _create("ablation_shortcut", pretrained, **kwargs)


@register_model
def ablation_no_norm(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline - attention normalisation (the sums divided by the token count instead)."""
    return _create("ablation_no_norm", pretrained, **kwargs)


@register_model
def ablation_single_head(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline - multi-head: one head per layer, Q/K size 16 (Mamba's state size)."""
    return _create("ablation_single_head", pretrained, **kwargs)


@register_model
def ablation_block_all(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + block design 'all': every attention + MLP pair becomes one Mamba-style block
    with E=2 (in/gate projections to 2C, DWConv, SiLU, linear attention, SiLU gate, out-projection).

    Outside the paper's tolerance (32.7M / 5.4 GMACs against 28M / 4.7G): Mamba's block with
    E=2 has ``6 C^2`` weights; the baseline's multi-head linear attention in place of the SSM adds
    ``q, k`` projections of the ``2C`` inner width, ``8 C^2``: ``14 C^2`` against the Transformer
    block's ``12 C^2``. The paper does not say how it reaches 28M (fewer blocks, narrower q/k?);
    ``depths=(2, 2, 4, 2)`` matches it (28.5M, 4.6 GMACs) if a parameter-matched model is wanted.
    """
    return _create("ablation_block_all", pretrained, **kwargs)


@register_model
def ablation_block_sub(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + block design 'sub': the attention sub-block becomes a Mamba-style block (E=1),
    the MLP is kept."""
    return _create("ablation_block_sub", pretrained, **kwargs)


@register_model
def ablation_ape(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + APE: a learned absolute position table added at the start of every block."""
    return _create("ablation_ape", pretrained, **kwargs)


@register_model
def ablation_lepe(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + LePE: ``+ DWConv3x3(v)`` on the attention output, before its projection."""
    return _create("ablation_lepe", pretrained, **kwargs)


@register_model
def ablation_cpe(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + CPE: ``x = x + DWConv3x3(x)`` at the start of every block."""
    return _create("ablation_cpe", pretrained, **kwargs)


@register_model
def ablation_rope(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Baseline + RoPE: 2-d rotary embedding of ``phi(q), phi(k)`` (normaliser un-rotated, as MLLA)."""
    return _create("ablation_rope", pretrained, **kwargs)


@register_model
def ablation_causal(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Control for the forget gate: the baseline's attention made causal over the raster scan,
    without the gate's decay (what '+ forget gate' changes besides the gate)."""
    return _create("ablation_causal", pretrained, **kwargs)


@register_model
def ablation_forget_gate_bidir(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Control for the forget gate: a forward and a backward gated scan, averaged, so every token
    sees the whole image (vision Mambas scan both ways)."""
    return _create("ablation_forget_gate_bidir", pretrained, **kwargs)


@register_model
def ablation_single_head_full_qk(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Control for '- multi-head': one head per layer with the full Q/K width ``C`` (the
    paper's single-head variant also shrinks Q/K to 16)."""
    return _create("ablation_single_head_full_qk", pretrained, **kwargs)


@register_model
def ablation_block_all_matched(pretrained: bool = False, **kwargs: Any) -> LinearSwin:
    """Control for '+ block design (all)': expansion ``E = 1.8125`` instead of 2, which brings the
    block's ``(3 E + 2 E^2) C^2`` weights to the Transformer block's ``12 C^2`` (28.3M at the
    Swin-T size, the baseline's 28.3M; 3% more at the study's reduced width)."""
    return _create("ablation_block_all_matched", pretrained, **kwargs)
