"""The paper's ablation models: registered, any input size, paper's parameter and MAC counts."""
from __future__ import annotations

import pytest
import timm
import torch

import mlla
from mlla.layers.gated_attention import GatedLinearAttention
from mlla.profiling import model_stats

VARIANTS = [
    "ablation_baseline", "ablation_input_gate", "ablation_forget_gate", "ablation_shortcut",
    "ablation_no_norm", "ablation_single_head", "ablation_block_all", "ablation_block_sub",
    "ablation_ape", "ablation_lepe", "ablation_cpe", "ablation_rope",
]
SMALL = dict(embed_dim=16, depths=(1, 1, 1, 1), num_classes=7, img_size=64)
# Documented in the model's docstring: no faithful reading of the paper reaches its numbers.
OUTSIDE_PAPER_TOLERANCE = {"ablation_block_all"}


def _small(name: str, **kwargs) -> torch.nn.Module:
    heads = {} if name == "ablation_single_head" else dict(num_heads=(1, 2, 2, 4))
    return mlla.create_model(name, **dict(SMALL, **heads, **kwargs))


def test_all_variants_listed_with_paper_numbers():
    assert mlla.list_models("ablation_*") == sorted(VARIANTS)
    for name in VARIANTS:
        assert {"params_m", "top1"} <= set(mlla.PAPER_RESULTS[name])


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_any_size_and_backward(name):
    model = _small(name)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        odd = model(torch.randn(1, 3, 45, 70))  # not a multiple of 32, other aspect ratio
    assert odd.shape == (1, 7) and torch.isfinite(odd).all()


def test_features_and_classifier_reset():
    model = _small("ablation_rope")
    feats = model.forward_features(torch.randn(1, 3, 96, 64))
    assert feats.shape == (1, 3, 2, 128)
    model.reset_classifier(3)
    assert model.forward_head(feats).shape == (1, 3)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 128)


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_gmacs_match_paper(name):
    stats, paper = model_stats(name), mlla.PAPER_RESULTS[name]
    within = abs(stats["params_m"] - paper["params_m"]) <= 1.5 and (
        "gmacs" not in paper or abs(stats["gmacs"] - paper["gmacs"]) <= 0.3
    )
    if name in OUTSIDE_PAPER_TOLERANCE:
        assert not within, f"{name} now matches the paper: drop it from OUTSIDE_PAPER_TOLERANCE"
        assert "tolerance" in timm.models.model_entrypoint(name).__doc__
    else:
        assert within, f"{name}: measured {stats}, paper {paper}"


def test_forget_gate_attention_is_causal_and_others_global():
    x = torch.randn(1, 4, 5, 16)
    later = x.clone()
    later[0, 3, 2] += 1.0  # token 17 of 20 in raster order
    for forget_gate in (True, False):
        attn = GatedLinearAttention(16, 2, forget_gate=forget_gate).eval()
        changed = (attn(later) - attn(x)).abs().flatten(1, 2).amax(-1)[0] > 1e-6  # per token
        assert changed[17:].all()
        assert changed[:17].any() != forget_gate


def test_ape_is_resampled_to_the_grid():
    model = _small("ablation_ape")
    ape = model.stages[0][0].ape
    assert ape.pos.shape[1:3] == (16, 16)
    x = torch.zeros(1, 10, 12, 16)
    assert ape(x).shape == x.shape and ape(x).abs().sum() > 0


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match="pos_embed"):
        mlla.create_model("ablation_baseline", pos_embed="sincos")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        mlla.create_model("ablation_baseline", embed_dim=16, num_heads=(3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _small("ablation_baseline")(torch.randn(1, 64, 64, 3))
