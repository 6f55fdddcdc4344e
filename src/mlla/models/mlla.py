"""MLLA: Mamba-Like Linear Attention vision models.

Paper: "Demystify Mamba in Vision: A Linear Attention Perspective", Han et al., NeurIPS 2024
(arXiv:2405.16605). Architecture as in the authors' code (commit 66b6d29), re-implemented:
channels-last tokens throughout, RoPE computed for the actual grid (any input size), input and
gate projections fused into one matmul.

Layout: ``stem`` (stride 4) -> ``stages.{0..3}`` (``downsample`` at the start of stages 1-3,
then ``blocks``) -> ``norm`` -> ``head.fc``. With ``stage_norms=True`` (set automatically for
``features_only=True``) each stage output also gets its own LayerNorm, as in the authors'
detection/segmentation backbone.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import load_weights, read_checkpoint, select_weights, unwrap_state_dict
from ..layers import MllaBlock, MllaDownsample, MllaStem
from ..layers.block import tracing
from ..layers.conv import register_notrace_function, timm_factory_kwargs
from ..ops.rope import rope_2d_head_tables

__all__ = ["MLLA", "MllaStage", "checkpoint_filter_fn", "rope_table_cache"]

_logger = logging.getLogger(__name__)


class _RopeTableCache:
    """RoPE tables of recent grids in eager mode: about 18 small kernels per stage and call saved
    (on a GPU at small batches every launch costs CPU time the GPU waits for). Tables of at most
    :attr:`max_table_bytes` each, :attr:`max_bytes` in all, least recently used dropped first;
    made outside inference mode, so that a training step may use tables an inference call made."""

    max_table_bytes = 4 << 20
    max_bytes = 32 << 20

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, height: int, width: int, dim: int, num_heads: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, dim, num_heads, device, dtype)
        with self._lock:
            if key in self._tables:
                self._tables.move_to_end(key)
                return self._tables[key]
        with torch.inference_mode(False):
            tables = rope_2d_head_tables(height, width, dim, num_heads, device=device, dtype=dtype)
        if _nbytes(tables) <= self.max_table_bytes:
            with self._lock:
                self._tables[key] = tables
                while sum(map(_nbytes, self._tables.values())) > self.max_bytes:
                    self._tables.popitem(last=False)
        return tables

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


def _nbytes(tables: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tables)


rope_table_cache = _RopeTableCache()


@torch.fx.wrap
@register_notrace_function
def stage_rope_tables(x: torch.Tensor, dim: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the grid of the tokens ``x: (B, H, W, C)``, on its device, in its dtype (at
    least float32). A leaf for ``torch.fx`` tracing: the grid size is read from ``x``'s shape. In
    eager mode from :data:`rope_table_cache` (the tables are constants of the grid: callers must
    not modify them); under ``torch.compile``, ``torch.export`` and the TorchScript tracer computed."""
    height, width, dtype = x.shape[1], x.shape[2], torch.promote_types(x.dtype, torch.float32)
    if tracing():
        return rope_2d_head_tables(height, width, dim, num_heads, device=x.device, dtype=dtype)
    return rope_table_cache(height, width, dim, num_heads, x.device, dtype)


@torch.fx.wrap
@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """Raise a :class:`ValueError` that says what to do unless ``x`` is ``(B, in_chans, H, W)``.
    A leaf for ``torch.fx`` tracing (checks on the shape are Python control flow)."""
    if x.ndim != 4:
        raise ValueError(
            f"MLLA expects an image batch of shape (B, {in_chans}, H, W), got a "
            f"{x.ndim}-d tensor of shape {tuple(x.shape)}; add a batch dimension with x[None]"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"MLLA was built for {in_chans} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}); pass in_chans={x.shape[1]} when creating the "
            f"model, or give NCHW rather than NHWC input"
        )


class MllaStage(nn.Module):
    """Optional downsampling, then ``depth`` MLLA blocks sharing one RoPE table.

    ``(B, H, W, in_dim) -> (B, H', W', dim)`` with ``H' = ceil(H / 2)`` when downsampling.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grad_checkpointing = False
        self.downsample = MllaDownsample(in_dim, dim, **dd) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            MllaBlock(dim, num_heads, mlp_ratio, qkv_bias, drop_path[i], norm_layer, **dd) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        rope = stage_rope_tables(x, self.dim, self.num_heads)  # once for this grid and stage
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x


class MLLA(nn.Module):
    """Mamba-Like Linear Attention model (MLLA-T/S/B and custom sizes).

    Input ``(B, in_chans, H, W)`` of any size; ``forward_features`` returns channels-last
    ``(B, ceil(H / 32), ceil(W / 32), 8 C)``, ``forward`` the logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 4, 8, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        stage_norms: bool = False,
        img_size: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            in_chans: image channels.
            num_classes: classifier outputs (0 for no classifier).
            global_pool: pooling before the classifier (timm pool types, 'avg' default).
            embed_dim: channels ``C`` of the first stage; stage ``i`` has ``C * 2**i``.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            mlp_ratio: MLP hidden width over block width.
            qkv_bias: bias in the q/k projection.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, rising linearly over all blocks up to this value.
            norm_layer: token normalisation layer.
            stage_norms: add a LayerNorm per stage output (``norm0..norm3`` of the authors'
                backbone); applied in ``forward_intermediates``.
            img_size: accepted for timm compatibility and ignored: any input size works.
            device, dtype: where and in which dtype parameters and buffers are created (timm's
                factory keywords).
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.output_fmt = "NHWC"
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = MllaStem(in_chans, embed_dim, **dd)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.Sequential()
        self.feature_info = []
        prev_dim, block_idx = embed_dim, 0
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            self.stages.append(
                MllaStage(
                    prev_dim, dim, depth, heads,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[block_idx:block_idx + depth],
                    norm_layer=norm_layer,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            prev_dim, block_idx = dim, block_idx + depth
        self.stage_norms = nn.ModuleList(norm_layer(d, **dd) for d in dims) if stage_norms else None
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC",
            **timm_factory_kwargs(device, dtype),
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
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        param = next(self.stem.parameters())  # the new classifier goes where the model is, in its dtype
        self.head.to(device=param.device, dtype=param.dtype)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook for ``pretrained=True``: as :func:`mlla.load_checkpoint`
        (safe reader, one weight-selection rule), keeping the classifier for another class count
        and adapting the first convolution to ``in_chans`` as timm does for its own models."""
        source = str(checkpoint_path)
        weights = checkpoint_filter_fn(select_weights(read_checkpoint(checkpoint_path), source=source))
        first_conv = "stem.conv1.conv.weight"
        if first_conv in weights and weights[first_conv].shape[1] != self.in_chans:
            _logger.info("%s: first convolution adapted from %d to %d input channels", source, weights[first_conv].shape[1], self.in_chans)
            weights[first_conv] = adapt_input_conv(self.in_chans, weights[first_conv])
        load_weights(self, weights, source=source, allow_head_mismatch=True)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) and optionally the final features.

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: stages to return (last ``n`` if int, all if None).
            norm: apply the final ``norm`` to the last stage's output when taken (models with
                ``stage_norms`` always apply their per-stage norms instead).
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of stage outputs.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_image_batch(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages

        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                if self.stage_norms is not None:
                    y = self.stage_norms[i](x)
                else:
                    y = self.norm(x) if norm and i == last_idx else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) not needed for ``indices``; returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if self.stage_norms is not None:
            self.stage_norms = self.stage_norms[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, ceil(H / 32), ceil(W / 32), num_features)``, normalised."""
        check_image_batch(x, self.in_chans)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool channels-last features and classify; ``pre_logits`` returns pooled features."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse(self, fused_inference: bool = True) -> MLLA:
        """Prepare for inference: fold the BatchNorms of the stem and downsampling layers into
        their convolutions, and (``fused_inference``) switch the blocks to their fused eager
        inference path (``MllaBlock.forward_fused``: in place, in token chunks).

        Puts the model in eval mode; outputs are unchanged up to float rounding; the folded
        ``bn``/``norm`` modules become identities and leave the state dict. The fused blocks
        refuse autograd, autocast, hooks on and replacements of the modules they read
        (``set_fused_inference(False)`` turns them back); ``torch.compile`` and ``torch.export``
        trace the plain path. Returns the model.
        """
        self.eval()
        self.stem.fuse()
        for stage in self.stages:
            if isinstance(stage.downsample, MllaDownsample):
                stage.downsample.fuse()
        self.set_fused_inference(fused_inference)
        return self

    def set_fused_inference(self, enable: bool = True) -> MLLA:
        """Select the blocks' fused eager inference path (``True``) or the plain one; returns the model."""
        for module in self.modules():
            if isinstance(module, MllaBlock):
                module.fused_inference = enable
        return self


# Renames from the authors' key layout (LeapLabTHU/MLLA) to ours, applied in order.
_AUTHORS_KEY_MAP = [
    (r"^patch_embed\.conv1\.norm\.", "stem.conv1.bn."),
    (r"^patch_embed\.conv1\.conv\.", "stem.conv1.conv."),
    (r"^patch_embed\.conv2\.(\d)\.norm\.", r"stem.res.\1.bn."),
    (r"^patch_embed\.conv2\.(\d)\.conv\.", r"stem.res.\1.conv."),
    (r"^patch_embed\.conv3\.0\.norm\.", "stem.conv2.bn."),
    (r"^patch_embed\.conv3\.0\.conv\.", "stem.conv2.conv."),
    (r"^patch_embed\.conv3\.1\.norm\.", "stem.proj.bn."),
    (r"^patch_embed\.conv3\.1\.conv\.", "stem.proj.conv."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.dwc\.", r"stages.\1.blocks.\2.dwconv."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^norm(\d)\.", r"stage_norms.\1."),
    (r"^head\.", "head.fc."),
]
_AUTHORS_DOWNSAMPLE_MAP = {"conv.0.conv": "expand", "conv.1.conv": "dwconv", "conv.2.conv": "project", "conv.2.norm": "norm"}
_DOWNSAMPLE_RE = re.compile(r"^layers\.(\d+)\.downsample\.(conv\.\d\.(?:conv|norm))\.(.+)$")
_SPLIT_PROJ_RE = re.compile(r"^(stages\.\d+\.blocks\.\d+)\.(in_proj|act_proj)\.(weight|bias)$")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Map an MLLA checkpoint in the authors' layout (or ours) to this implementation.

    Accepts a classification checkpoint (``.pth`` dict with a ``model`` key, or a bare state
    dict), the authors' backbone layout (``norm0..norm3``, no head) and mmdet/mmseg checkpoints
    (``backbone.`` prefix). Drops the authors' fixed-size ``attn.rope.rotations`` buffers (RoPE
    is computed for the actual input size) and fuses ``in_proj`` / ``act_proj`` into our single
    ``in_proj``. If ``model`` is given, weights it has but the checkpoint lacks because of the
    layout (``stage_norms`` vs ``norm``/``head``) are taken from the model, and every shape is
    checked, raising :class:`ValueError` that lists the mismatches.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith("patch_embed.") for k in state_dict):
        state_dict = _convert_authors_layout(state_dict)
    if model is not None:
        state_dict = _complete_and_check(state_dict, model)
    return state_dict


def _convert_authors_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    split_proj: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.endswith("attn.rope.rotations"):
            continue
        m = _DOWNSAMPLE_RE.match(k)
        if m:
            out[f"stages.{int(m.group(1)) + 1}.downsample.{_AUTHORS_DOWNSAMPLE_MAP[m.group(2)]}.{m.group(3)}"] = v
            continue
        for pattern, repl in _AUTHORS_KEY_MAP:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        m = _SPLIT_PROJ_RE.match(k)
        if m:
            split_proj.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        out[k] = v
    for (prefix, param), parts in split_proj.items():
        if set(parts) != {"in_proj", "act_proj"}:
            raise ValueError(f"checkpoint has only {sorted(parts)} for {prefix}.{param}; expected in_proj and act_proj")
        out[f"{prefix}.in_proj.{param}"] = torch.cat([parts["in_proj"], parts["act_proj"]], dim=0)
    return out


def _complete_and_check(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    # A layer group the checkpoint's layout has none of (norm0..3 in a classification checkpoint,
    # norm and head in a backbone's) keeps the model's initial values; a group it has only part
    # of stays missing, and strict loading reports it.
    layout_group = re.compile(r"^(stage_norms|norm|head)\.")
    present = {m.group(1) for k in state_dict if (m := layout_group.match(k))}
    filled = [k for k in own if k not in state_dict and (m := layout_group.match(k)) and m.group(1) not in present]
    for k in filled:
        state_dict[k] = own[k]
    if filled:
        _logger.info("checkpoint has no %s: kept the model's initial values", sorted({k.rsplit('.', 1)[0] for k in filled}))
    # The other mode's layers: norm0..3 loaded into a classifier, or the final norm and classifier
    # loaded into a backbone (features_only prunes them).
    dropped = [k for k in state_dict if k.startswith(("stage_norms.", "norm.", "head.")) and k not in own]
    for k in dropped:
        del state_dict[k]
    if dropped:
        _logger.info("the model has no %s: dropped from the checkpoint", sorted({k.rsplit('.', 1)[0] for k in dropped}))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape and not k.startswith("head.fc.")
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint does not fit this model ({len(mismatched)} shape mismatches; is it for another "
            f"MLLA size?):\n  " + "\n  ".join(mismatched[:20]) + ("\n  ..." if len(mismatched) > 20 else "")
        )
    return state_dict


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "custom_load": True,  # timm downloads (and caches) the file, then calls MLLA.load_pretrained
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2405.16605",
        "paper_name": "Demystify Mamba in Vision: A Linear Attention Perspective",
        "origin_url": "https://github.com/LeapLabTHU/MLLA",
        **kwargs,
    }


# The authors' ImageNet-1k checkpoints (their README's table, LeapLabTHU/MLLA): training
# checkpoints in their layout, converted on load. The links end in "/?dl=1", so each url is a
# (url, file name) pair: the name timm caches the download under.
_AUTHORS_WEIGHTS = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"

default_cfgs = generate_default_cfgs({
    "mlla_tiny.in1k": _cfg(url=(_AUTHORS_WEIGHTS.format("7a19712877cb4242889c"), "mlla_tiny_in1k_authors.pth")),
    "mlla_small.in1k": _cfg(url=(_AUTHORS_WEIGHTS.format("0e5d0b1409d540aaa80c"), "mlla_small_in1k_authors.pth")),
    "mlla_base.in1k": _cfg(url=(_AUTHORS_WEIGHTS.format("91c85c5a1061496d8796"), "mlla_base_in1k_authors.pth")),
    "test_mlla.untrained": _cfg(input_size=(3, 160, 160), pool_size=(5, 5), crop_pct=0.95),
})


def _create_mlla(variant: str, pretrained: bool = False, **kwargs: Any) -> MLLA:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    if kwargs.get("features_only"):
        kwargs.setdefault("stage_norms", True)
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and (overlay.get("file") or overlay.get("url")):
        # timm resets custom_load for a user-given file or url; keep ours, so every file goes
        # through MLLA.load_pretrained (the safe reader and the one weight-selection rule).
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=overlay.get("custom_load", True))
    return build_model_with_cfg(
        MLLA,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def mlla_tiny(pretrained: bool = False, **kwargs: Any) -> MLLA:
    """MLLA-T: C=64, depths 2-4-8-4, heads 2-4-8-16 (24.4M params, 4.1 GMACs at 224)."""
    model_args = dict(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)
    return _create_mlla("mlla_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def mlla_small(pretrained: bool = False, **kwargs: Any) -> MLLA:
    """MLLA-S: C=64, depths 3-6-21-6, heads 2-4-8-16 (43.0M params, 7.3 GMACs at 224)."""
    model_args = dict(embed_dim=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.3)
    return _create_mlla("mlla_small", pretrained, **dict(model_args, **kwargs))


@register_model
def mlla_base(pretrained: bool = False, **kwargs: Any) -> MLLA:
    """MLLA-B: C=96, depths 3-6-21-6, heads 3-6-12-24 (96.0M params, 16.1 GMACs at 224)."""
    model_args = dict(embed_dim=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24), drop_path_rate=0.5)
    return _create_mlla("mlla_base", pretrained, **dict(model_args, **kwargs))


@register_model
def test_mlla(pretrained: bool = False, **kwargs: Any) -> MLLA:
    """A tiny MLLA for tests: C=16, depths 1-1-2-1, heads 1-1-2-4."""
    model_args = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), drop_path_rate=0.0)
    return _create_mlla("test_mlla", pretrained, **dict(model_args, **kwargs))
