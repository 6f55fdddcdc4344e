"""PyTorch tools see the model's plain modules: hooks, frozen-weight fine-tuning, adapters, dynamic
quantisation, torch.compile without graph breaks, channels-last input, and the explicit fused path."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import mlla  # noqa: F401

# Relative L2 error of dynamically quantised (int8 Linear) logits against fp32 (measured about 0.02).
QUANT_REL_ERROR = 0.06


def _model(**kwargs) -> nn.Module:
    return timm.create_model("test_mlla", num_classes=5, **kwargs)


def test_forward_hooks_fire_on_every_linear_under_no_grad():
    model = _model().eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 26  # 5 blocks x (in_proj, qk, out_proj, fc1, fc2) + head.fc
    seen = []
    for m in linears:
        m.register_forward_hook(lambda mod, inp, out: seen.append(mod))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(seen) == len(linears) and {id(m) for m in seen} == {id(m) for m in linears}


def test_layernorm_only_finetuning_trains():
    """Linear weights frozen, input without grad: the LayerNorms still get gradients and learn."""
    model = _model().train()
    for name, p in model.named_parameters():
        p.requires_grad_(any(isinstance(m, nn.LayerNorm) and name.startswith(n + ".") for n, m in model.named_modules() if n))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.parameters()))
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable))


class _LoRA(nn.Module):
    """An adapter around an ``nn.Linear``, with no ``weight``/``bias`` of its own (as LoRA libraries do)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.ones_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("grad", [False, True])
def test_adapter_wrapping_out_proj_changes_output(grad):
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        ref = model(x)
        block = model.stages[1].blocks[0]
        block.out_proj = _LoRA(block.out_proj)
        out = model(x)
    assert not torch.allclose(out, ref, atol=1e-4)
    block.out_proj.up.weight.data.zero_()  # a zero adapter gives the original output back
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_quantize_dynamic_runs_close_to_fp32():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        out = quantized(x)
    assert not any(type(m) is nn.Linear for m in quantized.modules())  # every Linear was replaced
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < QUANT_REL_ERROR, rel


@pytest.mark.slow  # about 30 s of dynamo tracing on a busy 2-core machine
def test_torch_compile_fullgraph_has_no_graph_breaks():
    model = _model().eval()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 32, 32))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_input_gives_the_same_output(train):
    model = _model().train(train)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-6)


def test_fused_inference_is_explicit_and_refuses_what_it_cannot_do():
    model = _model(drop_path_rate=0.1).eval()
    x = torch.randn(1, 3, 64, 64)
    blocks = [m for m in model.modules() if isinstance(m, mlla.layers.MllaBlock)]
    assert not any(b.fused_inference for b in blocks)  # the default is the plain path
    with torch.no_grad():
        ref = model(x)
        model.fuse()
        assert all(b.fused_inference for b in blocks)
        assert torch.allclose(model(x), ref, atol=1e-5)
        with pytest.raises(RuntimeError, match="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        model.train()
        with pytest.raises(RuntimeError, match="stochastic depth"):
            model(x)
        model.eval()
        handle = blocks[0].mlp.fc1.register_forward_hook(lambda *a: None)
        with pytest.raises(RuntimeError, match="mlp.fc1.*hooks"):
            model(x)
        handle.remove()
        blocks[0].out_proj = _LoRA(blocks[0].out_proj)
        with pytest.raises(RuntimeError, match="out_proj.*_LoRA"):
            model(x)
        model.set_fused_inference(False)
        assert model(x).shape == ref.shape
    with pytest.raises(RuntimeError, match="without autograd"):
        model.set_fused_inference(True)(x)


def test_fx_feature_extraction_traces_and_matches():
    """torchvision's create_feature_extractor (torch.fx) traces the model; odd sizes pad inside the traced graph."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _model().eval()
    extractor = create_feature_extractor(model, {"stages.1": "s1", "head": "logits"})
    with torch.no_grad():
        for size in ((64, 64), (45, 71)):
            x = torch.randn(1, 3, *size)
            out = extractor(x)
            assert torch.allclose(out["logits"], model(x), atol=1e-6)
            assert out["s1"].shape[1:3] == model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)[0].shape[1:3]


def test_timm_factory_keywords_device_and_dtype():
    meta = timm.create_model("test_mlla", device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in meta.parameters())
    model = timm.create_model("test_mlla", num_classes=3, dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    model.reset_classifier(4)
    assert model.head.fc.weight.dtype == torch.float64
    with pytest.raises(TypeError):
        timm.create_model("test_mlla", device="meta", not_a_model_arg=1)


def test_meta_device_model_loads_weights_and_rebuilds_its_buffers():
    """Built on the meta device, materialised with ``to_empty``, given a state dict: the same model once
    the non-persistent buffers (the CPE's identity kernels) are rebuilt, as timm's helper does."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    reference = timm.create_model("test_mlla").eval()
    model = timm.create_model("test_mlla", device="meta").to_empty(device="cpu").eval()
    model.load_state_dict(reference.state_dict())
    assert reinit_non_persistent_buffers(model)  # names the modules it rebuilt
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
