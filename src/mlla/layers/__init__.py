"""Modules built on :mod:`mlla.ops`: stem, downsampling, token mixers and blocks."""
from .attention import MllaLinearAttention
from .block import MllaBlock
from .conv import ConvNorm, DepthwiseConvNHWC
from .downsample import MllaDownsample
from .stem import MllaStem

__all__ = ["ConvNorm", "DepthwiseConvNHWC", "MllaBlock", "MllaDownsample", "MllaLinearAttention", "MllaStem"]
