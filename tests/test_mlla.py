"""MLLA models: sizes, the timm contract, any input size, dtypes, compile and bad input."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import mlla
from mlla.ops.rope import apply_rope_2d, rope_2d_head_tables, rope_2d_tables
from mlla.profiling import model_stats

# (params M, GMACs at 224) of the authors' code, SPEC section 3.
AUTHORS = {"mlla_tiny": (24.39, 4.13), "mlla_small": (43.02, 7.25), "mlla_base": (95.98, 16.11)}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_params_and_gmacs_match_authors(name):
    stats = model_stats(name)  # built on the meta device: no memory, no weights
    params, gmacs = AUTHORS[name]
    assert stats["params_m"] == pytest.approx(params, rel=0.01)
    assert stats["gmacs"] == pytest.approx(gmacs, rel=0.01)


def test_registered_in_timm_and_create_model():
    for name in ["mlla_tiny", "mlla_small", "mlla_base", "test_mlla"]:
        assert timm.is_model(name)
        assert name in mlla.list_models()
    model = mlla.create_model("test_mlla", num_classes=7, in_chans=1, embed_dim=8, depths=(1, 1, 1, 1))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert model.stem.conv1.conv.in_channels == 1 and model.num_features == 64
    with pytest.raises(ValueError, match="unknown model 'mlla_tinny'.*mlla_tiny"):
        mlla.create_model("mlla_tinny")


def test_construct_on_meta_device():
    with torch.device("meta"):
        model = timm.create_model("mlla_base")
        features = timm.create_model("mlla_tiny", features_only=True)
    assert all(p.is_meta for p in model.parameters())
    assert features.feature_info.channels() == [64, 128, 256, 512]


def test_pretrained_cfg():
    cfg = timm.create_model("mlla_tiny").pretrained_cfg
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["classifier"] == "head.fc" and cfg["first_conv"] == "stem.conv1.conv"
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_mlla"))
    assert data_cfg["interpolation"] == "bicubic"


def test_timm_model_contract():
    model = timm.create_model("test_mlla", num_classes=5).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3, 2, model.num_features)  # NHWC, stride 32
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        logits = model.forward_head(feats)
        assert torch.allclose(logits, model(x)) and logits.shape == (2, 5)
        assert torch.allclose(logits, model.get_classifier()(pre), atol=1e-6)
        model.reset_classifier(11)
        assert model(x).shape == (2, 11)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)

        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(16, 24, 16), (32, 12, 8), (64, 6, 4), (128, 3, 2)]
        assert torch.allclose(final, feats)
        only = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        assert [t.shape for t in only] == [(2, 12, 8, 32), (2, 3, 2, 128)]
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        assert len(early) == 2 and early[0].shape[1] == 64
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    groups = model.group_matcher()
    assert groups["stem"] == r"^stem"


def test_features_only_and_out_indices():
    model = timm.create_model("test_mlla", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [32, 128] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 100, 75))
    assert [f.shape for f in feats] == [(1, 32, 13, 10), (1, 128, 4, 3)]
    assert not any(k.startswith("head.fc") for k in model.state_dict())
    assert any(k.startswith("model.stage_norms.3") for k in model.state_dict())


@pytest.mark.parametrize("size", [(32, 32), (33, 65), (97, 150), (224, 160), (1024, 1024)])
def test_any_input_size(size):
    classifier = timm.create_model("test_mlla").eval()
    backbone = timm.create_model("test_mlla", features_only=True).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert classifier(x).shape == (1, 1000)
        feats = backbone(x)
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for i, f in enumerate(feats):
        assert f.shape == (1, 16 * 2**i, h, w)
        assert torch.isfinite(f).all()
        h, w = math.ceil(h / 2), math.ceil(w / 2)


def test_gradients_reach_every_parameter():
    model = timm.create_model("test_mlla", num_classes=4, drop_path_rate=0.1).train()
    loss = model(torch.randn(2, 3, 64, 48)).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing


def test_grad_checkpointing_same_output_and_grads():
    model = timm.create_model("test_mlla", num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    out_ref = model(x)
    out_ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_close_to_fp32(dtype):
    model = timm.create_model("test_mlla", features_only=True).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    for r, l in zip(ref, low):
        assert torch.isfinite(l).all()
        rel = (l.float() - r).norm() / r.norm()
        assert rel < 0.05, f"relative error {rel:.4f}"


def test_rope_matches_complex_rotation_and_is_computed_once_per_stage(monkeypatch):
    h, w, c = 5, 7, 16
    cos, sin = rope_2d_tables(h, w, c)
    x = torch.randn(2, h, w, c)
    # Independent reference: channel pairs as complex numbers times e^{i angle}.
    theta = 10000.0 ** (-torch.arange(c // 4) / (c // 4))
    rr, cc = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    angles = torch.cat([rr[..., None] * theta, cc[..., None] * theta], dim=-1)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, h, w, c // 2, 2)) * torch.polar(torch.ones_like(angles), angles))
    assert torch.allclose(apply_rope_2d(x, cos, sin), ref.reshape(2, h, w, c), atol=1e-5)
    assert cos.dtype == torch.float32 and not cos.is_complex()

    # The head-major per-pair tables the model uses hold the same angles.
    heads = 2
    head_cos, head_sin = rope_2d_head_tables(h, w, c, heads)
    per_pair = lambda t: t.reshape(h * w, heads, c // heads // 2, 2)[..., 1].transpose(0, 1)  # noqa: E731
    assert torch.allclose(head_cos, per_pair(cos), atol=1e-6) and torch.allclose(head_sin, per_pair(sin), atol=1e-6)
    # Under torch.compile they come from the opaque mlla::rope_2d_head_tables op, with the same values.
    graphs = []
    traced = torch.compile(lambda: rope_2d_head_tables(h, w, c, heads), fullgraph=True,
                           backend=lambda gm, inputs: graphs.append(gm) or gm.forward)()
    if hasattr(torch.library, "custom_op"):  # torch >= 2.4
        targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
        assert torch.ops.mlla.rope_2d_head_tables.default in targets and torch.cos not in targets
    compiled = torch.compile(lambda: rope_2d_head_tables(h, w, c, heads), fullgraph=True)()
    assert all(torch.equal(a, b) and torch.equal(a, t) for a, b, t in zip(compiled, (head_cos, head_sin), traced))

    import mlla.models.mlla as mlla_module

    calls = []
    original = mlla_module.rope_2d_head_tables
    monkeypatch.setattr(mlla_module, "rope_2d_head_tables", lambda *a, **k: calls.append(a) or original(*a, **k))
    model = timm.create_model("test_mlla", depths=(2, 2, 3, 2))
    mlla_module.rope_table_cache.clear()
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4  # once per stage, shared by the stage's blocks
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4  # in eager mode the next call finds them in the cache


def test_torch_compile_runs():
    model = timm.create_model("test_mlla", num_classes=3).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)


def test_bad_input_errors():
    model = timm.create_model("test_mlla")
    with pytest.raises(ValueError, match=r"expects an image batch of shape \(B, 3, H, W\).*3-d"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="built for 3 input channels, got 64"):
        model(torch.randn(1, 64, 64, 3))
    with pytest.raises(ValueError, match="same length"):
        mlla.MLLA(depths=(1, 1), num_heads=(1, 1, 1))


@pytest.mark.parametrize("grad", [False, True])
def test_attention_layer_is_the_unified_operator(grad):
    """MLLA's fast attention equals mlla.ops.gated_linear_attention with MLLA's settings."""
    from mlla.layers.attention import MllaLinearAttention
    from mlla.ops import gated_linear_attention

    torch.manual_seed(0)
    B, H, W, C, h = 2, 5, 7, 32, 4
    layer = MllaLinearAttention(C, h)
    x = torch.randn(B, H, W, C)
    cos, sin = rope_2d_tables(H, W, C)
    with torch.set_grad_enabled(grad):
        image = x.permute(0, 3, 1, 2)  # the layer takes (B, C, H, W) in channels-last memory
        out = layer(image, rope_2d_head_tables(H, W, C, h))
        qk = torch.nn.functional.elu(layer.qk(x)) + 1  # the authors' channel order
        q, k = qk.chunk(2, dim=-1)
        qr, kr = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        heads = lambda t: t.reshape(B, H * W, h, C // h)  # noqa: E731  (B, N, H, K)
        ref = gated_linear_attention(heads(qr), heads(kr), heads(x), q_norm=heads(q), k_norm=heads(k), mode="parallel")
        ref = ref.reshape(B, H, W, C) + layer.lepe(image).permute(0, 2, 3, 1)
    assert out.requires_grad == grad
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_fused_inference_path_equals_plain_path(monkeypatch, chunk_tokens):
    """The fused path (model.fuse()) runs in place, in token chunks; it must give what the plain path gives."""
    import mlla.layers.block as block_module

    model = timm.create_model("test_mlla", num_classes=6).eval()
    if chunk_tokens:  # 7-token chunks of the 4C-wide MLP hidden layer: many chunks and a remainder
        monkeypatch.setattr(block_module, "INFERENCE_CHUNK_BYTES", chunk_tokens * 4 * model.stages[0].dim * 4)
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        plain = model(x)
        fused = model.set_fused_inference(True)(x)
    assert torch.allclose(fused, plain, atol=1e-6)
    with pytest.raises(RuntimeError, match="without autograd"):
        model(x)  # grad enabled: refused, never a silent switch


def test_rope_tables_are_cached_in_eager_mode_only_small_and_usable_for_training():
    """The stages' RoPE tables come from a bounded cache in eager mode: the same outputs, fewer
    operators from the second call on, tables an inference-mode call made serve a training step,
    and tables above the size bound are not kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mlla.models.mlla import rope_table_cache

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    model = timm.create_model("test_mlla").eval()
    x = torch.randn(1, 3, 64, 48)
    rope_table_cache.clear()
    counts = []
    with torch.inference_mode():
        for _ in range(2):
            with Count() as count:
                out = model(x)
            counts.append(count.ops)
    assert counts[1] < counts[0]
    rope_table_cache.clear()
    assert torch.equal(model(x), out)  # computed afresh: the same
    rope_table_cache.clear()
    with torch.inference_mode():
        model(x)  # fills the cache
    model.train()(x).sum().backward()  # its tables are saved for backward: not inference tensors
    big = rope_table_cache(512, 512, 64, 2, torch.device("cpu"), torch.float32)  # 2 x 32 MiB: above the bound
    assert big is not rope_table_cache(512, 512, 64, 2, torch.device("cpu"), torch.float32)
    assert rope_table_cache(8, 8, 64, 2, torch.device("cpu"), torch.float32) is rope_table_cache(
        8, 8, 64, 2, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("shape", [(64, 1, 3, 3), (128, 64, 1, 1), (64, 32, 3, 3)])
def test_channels_last_kernels_keep_values_and_cost_no_kernel_in_the_backward(shape):
    """Depthwise and 1x1 kernels get channels-last strides by views whose backward launches nothing
    (an as_strided view's backward allocates and scatters); other kernels are copied."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mlla.layers.conv import DepthwiseConv, channels_last_kernel

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    weight = torch.randn(shape, requires_grad=True)
    _, I, kh, kw = shape
    with Ops() as ops:
        kernel = channels_last_kernel(weight)
        kernel.backward(torch.ones_like(kernel))
    assert torch.equal(kernel, weight) and kernel.stride() == (I * kh * kw, 1, kw * I, I)
    assert torch.equal(weight.grad, torch.ones(shape))
    if I == 1 or kh * kw == 1:
        assert "as_strided" not in ops.names and "new_zeros" not in ops.names
    conv = DepthwiseConv(8, residual=True)  # the parameter itself carries the strides
    assert conv.weight.stride() == (9, 1, 3, 1) and channels_last_kernel(conv.weight) is conv.weight
    assert channels_last_kernel(conv.kernel()).stride() == (9, 1, 3, 1)
