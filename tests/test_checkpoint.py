"""Checkpoint loading: safe by default, clear errors for corrupt files and other model sizes."""
from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch

import mlla
from mlla.checkpoint import CheckpointError, atomic_save, read_checkpoint, save_state_dict


def _authors_layout(model: mlla.MLLA) -> dict[str, torch.Tensor]:
    """Our weights re-keyed into the authors' layout (inverse of checkpoint_filter_fn's renames)."""
    out = {}
    stem = {"conv1": "conv1", "res.0": "conv2.0", "res.1": "conv2.1", "conv2": "conv3.0", "proj": "conv3.1"}
    down = {"expand": "conv.0.conv", "dwconv": "conv.1.conv", "project": "conv.2.conv", "norm": "conv.2.norm"}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "stem":
            name, rest = (".".join(parts[1:3]), parts[3:]) if parts[1] == "res" else (parts[1], parts[2:])
            rest = ["norm" if rest[0] == "bn" else rest[0], *rest[1:]]
            out[".".join(["patch_embed", stem[name], *rest])] = v
        elif parts[0] == "stages" and parts[2] == "downsample":
            out[".".join(["layers", str(int(parts[1]) - 1), "downsample", down[parts[3]], *parts[4:]])] = v
        elif parts[0] == "stages":
            key = ".".join(["layers", *parts[1:]]).replace(".dwconv.", ".dwc.")
            if ".in_proj." in key:
                inp, gate = v.chunk(2, dim=0)
                out[key] = inp
                out[key.replace("in_proj", "act_proj")] = gate
            else:
                out[key] = v
        elif parts[0] == "head":
            out["head." + parts[-1]] = v
        else:
            out[k] = v
    return out


def test_authors_layout_roundtrip_and_rope_buffers_dropped(tmp_path):
    model = timm.create_model("test_mlla").eval()
    sd = _authors_layout(model)
    sd["layers.0.blocks.0.attn.rope.rotations"] = torch.zeros(56, 56, 8, 2)
    torch.save({"model": sd}, tmp_path / "a.pth")
    fresh = mlla.load_checkpoint(timm.create_model("test_mlla"), tmp_path / "a.pth").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_other_model_size_lists_mismatches(tmp_path):
    path = save_state_dict(timm.create_model("test_mlla").state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)another MLLA size.*norm\.weight: checkpoint \(128,\) vs model \(256,\)"):
        mlla.load_checkpoint(timm.create_model("test_mlla", embed_dim=32), path)
    with pytest.raises(CheckpointError, match=r"22 missing keys \['stages\.2\.blocks\.2"):
        mlla.load_checkpoint(timm.create_model("test_mlla", depths=(1, 1, 3, 1)), path)


def test_class_count_mismatch(tmp_path):
    path = save_state_dict(timm.create_model("test_mlla", num_classes=10).state_dict(), tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="different number of classes"):
        mlla.load_checkpoint(timm.create_model("test_mlla", num_classes=5), path)
    model = mlla.load_checkpoint(timm.create_model("test_mlla", num_classes=5), path, allow_head_mismatch=True)
    assert model.head.fc.out_features == 5


def test_corrupt_and_missing_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("test_mlla").state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_pickled_objects_refused_unless_trusted(tmp_path):
    path = tmp_path / "with_config.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust_pickle=True)["config"].lr == 1.0


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.ones(3)}, target)

    def crash_midway(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(crash_midway, target)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left
    assert target.stat().st_mode & 0o044  # readable by others, like any written file
    assert torch.equal(read_checkpoint(target)["w"], torch.ones(3))  # old file intact


def test_cli_reports_clean_errors(tmp_path, capsys):
    assert mlla.cli.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert mlla.cli.main(["models", "mlla_t*"]) == 0
    out = capsys.readouterr().out
    assert "mlla_tiny" in out and "24.39" in out and "4.13" in out


@pytest.mark.parametrize("name", ["mlla_tiny", "mlla_small", "mlla_base"])
def test_convert_names_the_registered_size_of_a_state_dict(name):
    from mlla.commands.convert import describe_mlla_state_dict

    with torch.device("meta"):
        info = describe_mlla_state_dict(timm.create_model(name).state_dict())
    assert info["model"] == name and info["layout"] == "classification" and info["num_classes"] == 1000
    with torch.device("meta"):
        assert describe_mlla_state_dict(timm.create_model("test_mlla").state_dict())["model"] == "custom"
