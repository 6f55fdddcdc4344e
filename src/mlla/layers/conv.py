"""Convolution building blocks shared by the MLLA stem, downsampling and blocks."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

try:
    from timm.layers import register_notrace_function
except ImportError:  # timm < 1.0.10 (about): the helper lived in timm.models
    from timm.models._features_fx import register_notrace_function
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["ChannelsLastConv2d", "ConvNorm", "batchnorm_layout", "DepthwiseConv", "DepthwiseConvNHWC", "channels_last_kernel", "fold_batchnorm", "pad_to_multiple", "timm_factory_kwargs"]


def timm_factory_kwargs(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    """``device``/``dtype`` keywords for timm layers, only those given (older timm layers take none)."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


@torch.fx.wrap
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int, dims: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``x`` at the end of each of ``dims`` up to a multiple of ``multiple``.

    Returns ``x`` itself where the sizes already are multiples, except under ``torch.export``
    (symbolic sizes: it always pads, a no-op for such sizes). A leaf for ``torch.fx`` tracing (its
    size test is Python control flow); modules that call it also ``torch.fx.wrap`` it by name.
    """
    pads = {d % x.ndim: -x.shape[d] % multiple for d in dims}
    if not torch.compiler.is_exporting() and not any(pads.values()):
        return x
    last = min(pads)
    pad: list[int] = []
    for d in range(x.ndim - 1, last - 1, -1):  # F.pad lists the last dimension first
        pad += [0, pads.get(d, 0)]
    return F.pad(x, pad)


@torch.fx.wrap
@register_notrace_function
def batchnorm_layout(x: torch.Tensor, training: bool) -> torch.Tensor:
    """``x`` in the memory layout a BatchNorm should normalise it in.

    In training on CPUs, contiguous NCHW: PyTorch's CPU train-mode BatchNorm is 20-50x less
    accurate on channels-last tensors (its batch statistics and their gradients). Elsewhere ``x``
    as it is: CUDA's channels-last BatchNorm kernels are accurate, and on an H200 a bfloat16 train
    step of MLLA-T spent 15 of its 83 GPU milliseconds in the NCHW ones (``benchmarks/gpu_profile.py``).
    Reads the device, never the values; a leaf for ``torch.fx`` tracing.
    """
    return x.contiguous() if training and x.device.type == "cpu" else x


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an inference-mode ``bn`` that follows ``conv`` into the convolution, in place."""
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    conv.weight, conv.bias = weight, bias


def _channels_last_strides(shape: Sequence[int]) -> tuple[int, int, int, int]:
    _, I, kh, kw = shape
    return I * kh * kw, 1, kw * I, I


@torch.fx.wrap
@register_notrace_function
def channels_last_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A convolution kernel ``(O, I, kh, kw)`` with explicit channels-last strides.

    For a depthwise (``I = 1``) or ``1 x 1`` kernel, contiguous and channels-last strides describe
    the same memory, and oneDNN then takes the memory format from the input alone. An input of
    batch 1 can carry a zero batch stride (``torch.compile`` produces such views), which oneDNN
    does not recognise as channels-last: it would convolve in NCHW and return an NCHW output that
    costs a layout copy. Strides ``(I kh kw, 1, kw I, I)`` mark the kernel channels-last, so the
    convolution stays channels-last whatever the batch stride. Same values: a kernel that already
    has those strides as it is (:class:`ChannelsLastConv2d` gives them to its depthwise and 1x1
    kernels), other depthwise and 1x1 kernels restrided by squeeze/unsqueeze/permute views (whose
    backward launches nothing, where an ``as_strided`` view's costs two kernels per training
    step), other kernels copied. A leaf for ``torch.fx`` tracing.
    """
    strides = _channels_last_strides(weight.shape)
    if weight.stride() == strides:
        return weight
    _, I, kh, kw = weight.shape
    if I == 1:  # (O, 1, kh, kw) -> (O, kh, kw, 1) -> (O, 1, kh, kw) with stride 1 on the input channel
        weight = weight.squeeze(1).unsqueeze(-1).permute(0, 3, 1, 2)
    elif kh * kw == 1:  # (O, I, 1, 1) -> (O, 1, 1, I) -> (O, I, 1, 1)
        weight = weight.flatten(1).unsqueeze(1).unsqueeze(1).permute(0, 3, 1, 2)
    if weight.stride() == strides:
        return weight
    weight = weight.contiguous(memory_format=torch.channels_last)
    return weight.as_strided(weight.shape, strides)


class ConvNorm(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` on NCHW maps (``conv``, ``bn``, ``act``).

    In training on CPUs the BatchNorm gets a contiguous NCHW tensor (see :func:`batchnorm_layout`).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        act_layer: type[nn.Module] | None = nn.ReLU,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=bias, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = act_layer(inplace=True) if act_layer is nn.ReLU else act_layer() if act_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(batchnorm_layout(self.conv(x), self.training)))

    def fuse(self) -> None:
        """Fold ``bn`` into ``conv`` (inference); ``bn`` becomes an identity."""
        if isinstance(self.bn, nn.BatchNorm2d):
            fold_batchnorm(self.conv, self.bn)
            self.bn = nn.Identity()


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` with its kernel marked channels-last (see :func:`channels_last_kernel`).

    For inputs in channels-last memory: the output stays channels-last whatever the batch stride.
    Same parameters and state-dict keys as ``nn.Conv2d``; a depthwise or 1x1 kernel parameter
    carries channels-last strides from construction (the same memory as contiguous ones).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _, I, kh, kw = self.weight.shape
        if I == 1 or kh * kw == 1:  # same memory either way: mark the parameter itself
            w = self.weight.detach()
            marked = torch.empty_strided(w.shape, _channels_last_strides(w.shape), dtype=w.dtype, device=w.device)
            self.weight = nn.Parameter(marked.copy_(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, channels_last_kernel(self.kernel()), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def kernel(self) -> torch.Tensor:
        """The ``(O, I, kh, kw)`` kernel applied."""
        return self.weight


class DepthwiseConv(ChannelsLastConv2d):
    """Depthwise ``k x k`` convolution (stride 1, 'same' padding) on ``(B, C, H, W)`` in
    channels-last memory -> the same layout.

    With ``residual=True`` it computes ``x + DWConv(x)`` as one convolution, the identity added
    to the kernel's centre (the weights and state-dict keys are those of the plain convolution;
    the identity kernel is a non-persistent buffer, rebuilt by :meth:`init_non_persistent_buffers`
    after construction on the meta device, as timm's ``reinit_non_persistent_buffers`` calls it).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        bias: bool = True,
        residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias, device=device, dtype=dtype)
        self.residual = residual
        if residual:
            self.register_buffer("identity", torch.empty_like(self.weight), persistent=False)
            self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill the identity kernel (1 at each channel's centre tap), where ``residual``."""
        if self.residual:
            p = self.kernel_size[0] // 2
            with torch.no_grad():
                self.identity.zero_()[:, :, p, p] = 1.0

    def kernel(self) -> torch.Tensor:
        """The ``(C, 1, k, k)`` kernel applied, the identity included when ``residual``."""
        return self.weight + self.identity if self.residual else self.weight


class DepthwiseConvNHWC(DepthwiseConv):
    """:class:`DepthwiseConv` on channels-last tokens: takes and returns ``(B, H, W, C)``.

    The permutes are views: the convolution runs on a channels-last NCHW tensor, so no layout
    copy is made around it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A no-op for contiguous NHWC tokens; a strided view (a chunk of a wider projection) is
        # copied in its own layout, much faster than a channels-last copy of the permuted view.
        return super().forward(x.contiguous().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
