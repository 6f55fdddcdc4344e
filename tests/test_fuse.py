"""model.fuse() (BatchNorm folding) and the inference-speed paths of the MLLA layers."""
import pytest
import timm
import torch
from torch import nn

import mlla  # noqa: F401
from mlla.layers import DepthwiseConvNHWC


def _randomise_batchnorms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("size", [(64, 64), (97, 150)])
def test_fuse_keeps_outputs_and_removes_batchnorms(size):
    model = timm.create_model("test_mlla", num_classes=7).eval()
    _randomise_batchnorms(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()
        out = model(x)
    assert fused is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    model.fuse()  # idempotent
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)


def test_fuse_on_features_backbone():
    model = timm.create_model("test_mlla", features_only=True).eval()
    _randomise_batchnorms(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        model.model.fuse()
        out = model(x)
    assert len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, atol=1e-5, rtol=1e-5)


def test_unfused_state_dict_layout_unchanged():
    keys = set(timm.create_model("test_mlla").state_dict())
    for key in ("stem.conv1.bn.running_var", "stages.1.downsample.norm.weight", "stages.0.blocks.0.cpe1.weight",
                "stages.0.blocks.0.attn.qk.weight", "stages.0.blocks.0.in_proj.weight", "head.fc.weight"):
        assert key in keys
    assert not any("identity" in k for k in keys)


def test_residual_depthwise_conv_is_x_plus_conv():
    plain = DepthwiseConvNHWC(8)
    residual = DepthwiseConvNHWC(8, residual=True)
    residual.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 16, 8)[..., :, :, :]
    strided = torch.randn(2, 5, 6, 16)[..., :8]  # a chunk of a wider tensor
    for inp in (x, strided):
        out = residual(inp)
        assert out.shape == inp.shape
        assert torch.allclose(out, inp + plain(inp), atol=1e-6)


def test_training_step_has_gradients_everywhere():
    model = timm.create_model("test_mlla", num_classes=3).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
