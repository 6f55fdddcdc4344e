"""The authors' reference outputs are reproduced (../shared/reference, max abs diff < 1e-5, the README's figure)."""
from __future__ import annotations

import pytest
import timm
import torch

import mlla
import mlla.cli
from conftest import reference_case

TOL = 1e-5


def _authors_pth(case: dict, path) -> str:
    """Write the case's weights as the authors' classification checkpoint: a .pth with a 'model' key."""
    torch.save({"model": case["state_dict"], "epoch": 299, "max_accuracy": 0.0}, path)
    return str(path)


@pytest.mark.parametrize("name", ["cls_small_96", "cls_t_width_224"])
def test_classification_parity_timm_pretrained(name, tmp_path):
    case = reference_case(name)
    cfg = case["config"]
    path = _authors_pth(case, tmp_path / "authors.pth")
    model = timm.create_model(
        "mlla_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=cfg["num_classes"]), **cfg
    ).eval()
    with torch.no_grad():
        out = model(case["input"])
    assert out.shape == case["outputs"]["output"].shape
    assert (out - case["outputs"]["output"]).abs().max().item() < TOL


def test_classification_parity_load_checkpoint_safetensors(tmp_path):
    case = reference_case("cls_small_96")
    from safetensors.torch import save_file

    path = tmp_path / "authors.safetensors"
    save_file(case["state_dict"], str(path))  # bare state dict, authors' keys, rope buffers included
    model = mlla.load_checkpoint(mlla.MLLA(**case["config"]), path).eval()
    with torch.no_grad():
        assert (model(case["input"]) - case["outputs"]["output"]).abs().max().item() < TOL


def test_backbone_parity_features_only(tmp_path):
    case = reference_case("det_small_97x150")
    path = tmp_path / "backbone.pth"
    torch.save(case["state_dict"], path)  # the authors' backbone layout: norm0..norm3, no head
    model = timm.create_model(
        "mlla_tiny", features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **case["config"]
    ).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(case["input"])  # 2 x 3 x 97 x 150: odd, non-square
    assert len(feats) == 4
    for i, f in enumerate(feats):
        ref = case["outputs"][f"output.{i}"]
        assert f.shape == ref.shape
        assert (f - ref).abs().max().item() < TOL, f"stage {i}"


def test_backbone_checkpoint_from_mmdet_layout(tmp_path):
    case = reference_case("det_small_97x150")
    sd = {f"backbone.{k}": v for k, v in case["state_dict"].items()}
    sd["neck.lateral.weight"] = torch.zeros(3)  # non-backbone weights are ignored
    path = tmp_path / "mmdet.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, path)
    model = mlla.create_model("mlla_tiny", features_only=True, **case["config"])
    mlla.load_checkpoint(model, path)
    model.eval()
    with torch.no_grad():
        feats = model(case["input"])
    assert (feats[3] - case["outputs"]["output.3"]).abs().max().item() < TOL


def test_convert_command_roundtrip(tmp_path):
    case = reference_case("cls_small_96")
    src = _authors_pth(case, tmp_path / "authors.pth")
    dst = tmp_path / "ours.safetensors"
    assert mlla.cli.main(["convert", src, str(dst)]) == 0
    from safetensors import safe_open
    from safetensors.torch import load_file

    converted = load_file(str(dst))
    assert not any("rope" in k for k in converted)
    assert "stem.conv1.conv.weight" in converted
    with safe_open(str(dst), "pt") as f:
        assert '"embed_dim": 32' in f.metadata()["mlla"]
    model = mlla.MLLA(**case["config"])
    model.load_state_dict(converted)  # strict: our layout exactly
    with torch.no_grad():
        assert (model.eval()(case["input"]) - case["outputs"]["output"]).abs().max().item() < TOL
