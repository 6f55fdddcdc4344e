"""Checkpoint loading: safe by default, clear errors for corrupt files and other model sizes."""
from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch

import mlla
import mlla.cli
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


# ------------------------------------------------------------------ one rule on every route

class _Touch:
    """A pickled object whose unpickling would create ``path``: code from the file running."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mknod, (str(self.path),)


def _yacs_config_class(monkeypatch):
    """A class pickled as ``yacs.config.CfgNode``, like the authors' config (yacs is not installed)."""
    import sys
    import types

    class CfgNode(dict):
        def __init__(self, values=None):
            super().__init__(values or {})
            self.__dict__["__immutable__"] = True  # yacs keeps its flags in the instance dict

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


@pytest.fixture
def training_checkpoint(tmp_path, monkeypatch):
    """An authors' training checkpoint (their layout, ``model`` + ``state_dict_ema``, optimizer
    state and their yacs config object) and the two models its weights come from."""
    raw, ema = (timm.create_model("test_mlla", num_classes=4).eval() for _ in range(2))
    CfgNode = _yacs_config_class(monkeypatch)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "mlla", "NUM_CLASSES": 4}), "TRAIN": CfgNode({"EPOCHS": 300})})
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": _authors_layout(raw), "state_dict_ema": _authors_layout(ema),
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6}]}, "lr_scheduler": {"t_initial": 300},
                "max_accuracy": 83.5, "epoch": 299, "config": config}, path)
    for module in ("yacs", "yacs.config"):  # reading must not need the authors' classes
        monkeypatch.delitem(__import__("sys").modules, module)
    return path, raw, ema


def _same_weights(model, reference) -> bool:
    own = mlla.checkpoint.unwrap_features_only(model).state_dict()
    return all(torch.equal(own[k], v) for k, v in reference.state_dict().items())


def _train_config(tmp_path, checkpoint, **kw):
    from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
    from mlla.tasks.classification.settings import ClassificationConfig

    data = make_demo_dataset(tmp_path / "data", 1, 1, classes=DEMO_CLASSES[:4], progress=False)
    return ClassificationConfig(model="test_mlla", data_dir=str(data), output=str(tmp_path / "run"), batch_size=1, img_size=32,
                       workers=0, progress=False, model_ema=False, mixup=0.0, cutmix=0.0,
                       initial_checkpoint=str(checkpoint), **kw)


def test_every_route_loads_the_raw_weights_of_a_training_checkpoint_and_ema_on_request(training_checkpoint, tmp_path):
    from mlla.engine.checkpointing import load_model_weights
    from mlla.engine.trainer import Trainer

    path, raw, ema = training_checkpoint
    new = lambda: timm.create_model("test_mlla", num_classes=4)  # noqa: E731
    assert _same_weights(mlla.load_checkpoint(new(), path), raw)
    assert _same_weights(mlla.load_checkpoint(new(), path, use_ema=True), ema)
    model = new()
    assert load_model_weights(model, path)["epoch"] == 299 and _same_weights(model, raw)
    model = new()
    load_model_weights(model, path, use_ema=True)
    assert _same_weights(model, ema)
    for flags, reference in (([], raw), (["--use-ema"], ema)):
        out = tmp_path / f"converted{len(flags)}.safetensors"
        assert mlla.cli.main(["convert", str(path), str(out), *flags]) == 0
        assert _same_weights(mlla.load_checkpoint(new(), out), reference)
    timm_file = timm.create_model("test_mlla", num_classes=4, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert _same_weights(timm_file, raw)
    timm_url = timm.create_model("test_mlla", num_classes=4, pretrained=True, cache_dir=tmp_path / "cache",
                                 pretrained_cfg_overlay=dict(url=path.as_uri()))
    assert _same_weights(timm_url, raw)
    assert _same_weights(Trainer(_train_config(tmp_path / "a", path)).model, raw)
    assert _same_weights(Trainer(_train_config(tmp_path / "b", path, initial_checkpoint_ema=True)).model, ema)


def test_ema_requested_from_a_file_without_ema_is_a_clear_error(tmp_path):
    path = save_state_dict(timm.create_model("test_mlla").state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        mlla.load_checkpoint(timm.create_model("test_mlla"), path, use_ema=True)


def test_other_pickled_objects_are_refused_on_every_route_and_never_run(tmp_path, capsys):
    from mlla.engine.checkpointing import load_model_weights
    from mlla.engine.trainer import Trainer

    marker = tmp_path / "code_ran"
    path = tmp_path / "unsafe.pth"
    torch.save({"model": timm.create_model("test_mlla", num_classes=4).state_dict(), "config": _Touch(marker),
                "args": argparse.Namespace(lr=1.0)}, path)
    convert = "--trust-pickle"
    routes = {
        "load_checkpoint": lambda: mlla.load_checkpoint(timm.create_model("test_mlla", num_classes=4), path),
        "load_model_weights": lambda: load_model_weights(timm.create_model("test_mlla", num_classes=4), path),
        "timm file": lambda: timm.create_model("test_mlla", num_classes=4, pretrained=True,
                                               pretrained_cfg_overlay=dict(file=str(path))),
        "timm url": lambda: timm.create_model("test_mlla", num_classes=4, pretrained=True, cache_dir=tmp_path / "cache",
                                              pretrained_cfg_overlay=dict(url=path.as_uri())),
        "train --initial-checkpoint": lambda: Trainer(_train_config(tmp_path, path)),
    }
    for name, route in routes.items():
        with pytest.raises(CheckpointError, match=rf"(?s)Namespace.*mlla convert .*unsafe\.pth OUT\.safetensors {convert}"):
            route()
        assert not marker.exists(), name
    assert mlla.cli.main(["convert", str(path), str(tmp_path / "o.safetensors")]) == 2
    assert convert in capsys.readouterr().err and not marker.exists()


def test_pretrained_url_is_downloaded_once_into_timms_cache(training_checkpoint, tmp_path):
    path, raw, _ = training_checkpoint
    cache = tmp_path / "cache"
    url = (path.as_uri(), "mlla_test_authors.pth")  # the form of the registered cfgs: (url, cache file name)
    first = timm.create_model("test_mlla", num_classes=4, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=dict(url=url))
    assert (cache / "mlla_test_authors.pth").is_file()
    path.unlink()  # the second call reads the cached copy
    second = timm.create_model("test_mlla", num_classes=4, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=dict(url=url))
    assert _same_weights(first, raw) and _same_weights(second, raw)
    # another class count keeps the new classifier (fine-tuning), as timm does
    other = timm.create_model("test_mlla", num_classes=3, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=dict(url=url))
    assert other.head.fc.out_features == 3 and torch.equal(other.stem.proj.conv.weight, raw.stem.proj.conv.weight)


def test_registered_sizes_point_at_the_authors_published_weights():
    assert timm.list_pretrained("mlla_*") == ["mlla_base.in1k", "mlla_small.in1k", "mlla_tiny.in1k"]
    for name in ("mlla_tiny", "mlla_small", "mlla_base"):
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k").to_dict()
        url, filename = cfg["url"]
        assert url.startswith("https://cloud.tsinghua.edu.cn/f/") and filename == f"{name}_in1k_authors.pth"
        assert cfg["custom_load"]  # read by MLLA.load_pretrained, the safe reader


def test_classification_checkpoint_initialises_a_features_only_backbone_strictly(tmp_path, caplog):
    classifier = timm.create_model("test_mlla").eval()
    path = save_state_dict(classifier.state_dict(), tmp_path / "cls.safetensors")
    for route in ("load_checkpoint", "timm"):
        with caplog.at_level("INFO"):
            if route == "timm":
                backbone = timm.create_model("test_mlla", features_only=True, pretrained=True,
                                             pretrained_cfg_overlay=dict(file=str(path)))
            else:
                backbone = mlla.load_checkpoint(timm.create_model("test_mlla", features_only=True), path)
        inner = backbone.model
        assert torch.equal(inner.stages[3].blocks[0].mlp.fc2.weight, classifier.stages[3].blocks[0].mlp.fc2.weight)
        assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in inner.stage_norms)  # kept at init
        text = caplog.text
        assert "stage_norms" in text and "kept the model's initial values" in text
        if route == "load_checkpoint":  # timm loads before it prunes the final norm and classifier
            assert "the model has no ['head.fc', 'norm']: dropped from the checkpoint" in text
        caplog.clear()


def test_pretrained_route_adapts_the_first_convolution_to_in_chans(tmp_path):
    source = timm.create_model("test_mlla", num_classes=7)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    gray = timm.create_model("test_mlla", pretrained=True, in_chans=1, num_classes=7,
                             pretrained_cfg_overlay=dict(file=str(path)))
    expected = source.stem.conv1.conv.weight.sum(dim=1, keepdim=True)  # timm's rule for one channel
    torch.testing.assert_close(gray.stem.conv1.conv.weight, expected)
    torch.testing.assert_close(gray.head.fc.weight, source.head.fc.weight)
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 7)
