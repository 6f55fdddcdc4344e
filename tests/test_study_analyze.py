"""`mlla analyze`: each analysis checked against numbers known by construction."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mlla.cli import main
from mlla.layers.gated_attention import GatedLinearAttention
from mlla.models import create_model
from mlla.tasks.study.analyze import (
    AnalysisNotApplicable,
    analyze,
    attention_normalization,
    effective_receptive_field,
    erf_area_ratio,
    forget_gate_means,
    input_gate_maps,
    token_norm_spread,
)

TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3)


def _gated_layers(model: nn.Module, attr: str) -> list[GatedLinearAttention]:
    return [m for m in model.modules() if isinstance(m, GatedLinearAttention) and getattr(m, attr) is not None]


def test_forget_gate_forced_to_one_reads_one() -> None:
    model = create_model("ablation_forget_gate", **TINY)
    layers = _gated_layers(model, "forget_delta")
    assert len(layers) == 4
    with torch.no_grad():
        for m in layers:
            m.A_log.fill_(-math.inf)  # A = -exp(A_log) = 0: the gate exp(Delta A) is exactly 1
    means = forget_gate_means(model, torch.randn(2, 3, 32, 32))
    assert list(means) == ["stages.0.0.attn", "stages.1.0.attn", "stages.2.0.attn", "stages.3.0.attn"]
    assert all(v == 1.0 for v in means.values())


def test_forget_gate_mean_matches_a_constant_delta() -> None:
    model = create_model("ablation_forget_gate", **TINY)
    layer = _gated_layers(model, "forget_delta")[0]
    with torch.no_grad():
        layer.forget_delta.up.weight.zero_()
        layer.forget_delta.bias.fill_(0.3)  # Delta = softplus(0.3) everywhere
        layer.A_log.copy_(torch.log(torch.arange(1.0, layer.A_log.numel() + 1)))
    delta = torch.nn.functional.softplus(torch.tensor(0.3))
    expected = torch.exp(-delta * torch.arange(1.0, layer.A_log.numel() + 1)).mean()
    got = forget_gate_means(model, torch.randn(2, 3, 32, 32))["stages.0.0.attn"]
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_bidirectional_forget_gate_lists_both_scans() -> None:
    model = create_model("ablation_forget_gate_bidir", **TINY)
    layer = _gated_layers(model, "forget_delta")[0]
    with torch.no_grad():
        layer.A_log_backward.fill_(-math.inf)  # the backward gate is exactly 1, the forward one below 1
    means = forget_gate_means(model, torch.randn(2, 3, 32, 32))
    assert len(means) == 8 and means["stages.0.0.attn (backward)"] == 1.0 and means["stages.0.0.attn"] < 1.0


def test_forget_gate_on_a_model_without_one_is_a_clear_error() -> None:
    with pytest.raises(AnalysisNotApplicable, match="has no forget gate"):
        forget_gate_means(create_model("ablation_baseline", **TINY), torch.randn(1, 3, 32, 32))


def test_input_gate_map_has_the_grid_shape_and_matches_the_gate_module() -> None:
    model = create_model("ablation_input_gate", **TINY).eval()
    attn = model.stages[0][0].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    image = torch.randn(3, 48, 40)
    maps = input_gate_maps(model, image)
    handle.remove()
    first = maps["stages.0.0.attn"]
    assert first.shape == (12, 10)  # the stage-1 token grid: 48/4 x 40/4
    assert maps["stages.1.0.attn"].shape == (6, 5)
    with torch.no_grad():
        direct = attn.input_gate(seen["x"])[0].mean(dim=-1)
    torch.testing.assert_close(first, direct)
    assert bool((first > 0).all())  # softplus: a positive gate


def test_token_norm_spread_by_hand() -> None:
    class OneLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = GatedLinearAttention(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x.permute(0, 2, 3, 1))

    model = OneLayer().eval()
    x = torch.randn(2, 4, 3, 3)
    stats = token_norm_spread(model, x)["attn"]
    with torch.no_grad():
        y = model(x)  # (2, 3, 3, 4)
    norms = y.reshape(2, 9, 4).norm(dim=-1)
    by_hand = [math.sqrt(sum((n - sum(row) / 9) ** 2 for n in row) / 9) for row in norms.tolist()]
    assert stats["std"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert stats["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
    cv_by_hand = [sd / (sum(row) / 9) for sd, row in zip(by_hand, norms.tolist())]
    assert stats["cv"] == pytest.approx(sum(cv_by_hand) / 2, rel=1e-5)
    with attention_normalization(model, False) as switched:
        off = token_norm_spread(model, x)["attn"]
    assert switched == 1 and model.attn.normalize  # restored afterwards
    assert off["std"] != pytest.approx(stats["std"])


def test_identity_model_receptive_field_is_one_pixel() -> None:
    class Identity(nn.Module):
        output_fmt = "NCHW"

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x

    erf = effective_receptive_field(Identity(), torch.randn(3, 3, 9, 9))
    assert erf.shape == (9, 9)
    assert erf[4, 4] == 3.0  # three input channels, each gradient 1
    assert int((erf != 0).sum()) == 1
    assert erf_area_ratio(erf, 0.99) == pytest.approx(1 / 81)


def test_conv_receptive_field_is_its_kernel() -> None:
    class Conv(nn.Module):
        output_fmt = "NHWC"

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).permute(0, 2, 3, 1)

    erf = effective_receptive_field(Conv(), torch.randn(2, 3, 11, 11))
    support = (erf != 0).nonzero()
    assert support.min(0).values.tolist() == [4, 4] and support.max(0).values.tolist() == [6, 6]


def test_analyze_a_study_checkpoint_beside_its_untrained_twin_and_the_baseline(tmp_path) -> None:
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    study = tmp_path / "study"
    ckpts = {}
    for name in ("ablation_forget_gate", "ablation_baseline"):
        model = create_model(name, num_classes=3, **kwargs)
        ckpts[name] = study / name / "seed1" / "last.pth"
        ckpts[name].parent.mkdir(parents=True)
        torch.save(dict(model=model.state_dict(), config=dict(model=name, model_kwargs=kwargs, img_size=32, seed=1),
                        class_to_idx={"a": 0, "b": 1, "c": 2}), ckpts[name])
    trained = create_model("ablation_forget_gate", num_classes=3, **kwargs)
    trained.load_state_dict(torch.load(ckpts["ablation_forget_gate"])["model"])
    torch.manual_seed(1)
    twin = create_model("ablation_forget_gate", num_classes=3, **kwargs)
    written = analyze(str(ckpts["ablation_forget_gate"]), None, tmp_path / "out", num_images=2)
    assert set(written) == {"forget-gate", "token-norms", "erf"}  # no input gate in this model
    for paths in written.values():
        png = [p for p in paths if p.suffix == ".png"][0]
        assert png.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "forget_gate.json").read_text())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    assert list(saved["means"]) == ["ablation_forget_gate (trained)", "ablation_forget_gate (untrained, seed 1)"]
    assert saved["means"]["ablation_forget_gate (trained)"] == pytest.approx(forget_gate_means(trained, images))
    assert saved["means"]["ablation_forget_gate (untrained, seed 1)"] == pytest.approx(forget_gate_means(twin, images))
    norms = json.loads((tmp_path / "out" / "token_norms.json").read_text())
    assert list(norms["runs"]) == ["ablation_forget_gate (trained)", "ablation_forget_gate (untrained, seed 1)",
                                   "ablation_baseline (trained, seed1)",
                                   "ablation_forget_gate (trained), normalisation switched off"]
    assert all("cv" in layer for run in norms["runs"].values() for layer in run.values())
    erf = json.loads((tmp_path / "out" / "erf.json").read_text())
    assert erf["erf_size"] == 256  # 8 x 8 tokens in the last of 4 stages (reduction 32)
    assert len(erf["maps"]) == 3 and len(next(iter(erf["maps"].values()))) == 256


def test_cli_refuses_an_analysis_that_does_not_apply(tmp_path, capsys) -> None:
    code = main(["analyze", "ablation_baseline", "--analyses", "forget-gate", "--img-size", "32",
                 "--model-kwargs", "embed_dim=8", "depths=1,1,1,1", "num_heads=1,1,1,1", "--output", str(tmp_path)])
    assert code == 2
    assert "has no forget gate" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_untrained_twin_is_the_runs_initial_weights(tmp_path, monkeypatch) -> None:
    import mlla.tasks.classification.task as classification
    from mlla.engine.trainer import fit
    from mlla.tasks.study.ablate import StudySpec, _prepare_data, variant_config
    from mlla.tasks.study.analyze import load_model

    initial = {}
    build = classification.create_model

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})  # the last: the one training starts from
        return model

    monkeypatch.setattr(classification, "create_model", recording)
    recipe = dict(StudySpec(output=tmp_path).recipe, epochs=1, batch_size=16, warmup_epochs=0)
    spec = StudySpec(output=tmp_path, model_kwargs=dict(embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 1)),
                     study_data=dict(train_per_class=2, val_per_class=1), recipe=recipe, progress=False)
    _prepare_data(spec)
    cfg = variant_config(spec, "ablation_forget_gate", seed=3)
    fit(cfg)
    monkeypatch.undo()  # load_model builds through the same function
    twin, info = load_model(str(Path(cfg.output) / "last.pth"), weights=False)
    trained, _ = load_model(str(Path(cfg.output) / "last.pth"))
    assert info["source"] == "untrained, seed 3"
    state = twin.state_dict()
    assert set(state) == set(initial) and all(torch.equal(state[k], initial[k]) for k in state)
    assert any(not torch.equal(trained.state_dict()[k], initial[k]) for k in state)  # training moved the weights
