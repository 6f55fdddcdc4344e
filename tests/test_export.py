"""ONNX and torch.export: one file, dynamic batch and image size, outputs equal to PyTorch."""
import pytest
import timm
import torch

import mlla
import mlla.export as export_module
from mlla.cli import main
from mlla.export import check_export, export_program, save_program

SIZES = [(64, 64), (96, 128), (128, 160)]
pytestmark = pytest.mark.slow  # tracing with symbolic shapes: ~30-50 s on 2 cores


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    model = timm.create_model("test_mlla", num_classes=5).eval()
    return model, export_program(model, example_size=(64, 64))


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torch-export", ".pt2")])
def test_one_file_matches_pytorch_at_several_sizes_and_batches(traced, tmp_path, fmt, suffix):
    model, program = traced
    path = save_program(program, tmp_path / f"m{suffix}", fmt)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    for batch, sizes in ((1, SIZES), (3, SIZES[1:2])):
        diffs = check_export(path, model, sizes, batch_size=batch)
        assert set(diffs) == {f"{h}x{w}" for h, w in sizes}
        assert max(diffs.values()) < 1e-4, diffs


def test_export_leaves_the_model_unfused(traced):
    model, _ = traced
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_bad_arguments(traced, tmp_path):
    model, program = traced
    with pytest.raises(ValueError, match="multiple of 32"):
        export_program(model, example_size=(70, 64))
    with pytest.raises(ValueError, match="format"):
        save_program(program, tmp_path / "m.bin", "tflite")
    with pytest.raises(FileNotFoundError):
        check_export(tmp_path / "missing.onnx", model, SIZES)


def test_cli_exports_checkpoint_and_checks(traced, tmp_path, monkeypatch, capsys):
    model, program = traced
    ckpt = mlla.save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setattr(export_module, "export_program", lambda *a, **k: program)  # tracing is tested above
    out = tmp_path / "m.pt2"
    rc = main(["export", "--model", "test_mlla", "--num-classes", "5", "--checkpoint", str(ckpt), "--format", "torch-export",
               "--output", str(out), "--example-size", "64", "--check-sizes", "64", "96x128"])
    assert rc == 0 and out.is_file()
    assert "outputs match PyTorch" in capsys.readouterr().out
    # a model with other weights does not match the file: the check fails loudly
    rc = main(["export", "--model", "test_mlla", "--num-classes", "5", "--output", str(tmp_path / "n.pt2"), "--format", "torch-export",
               "--example-size", "64", "--check-sizes", "64"])
    assert rc == 2 and "differ from PyTorch" in capsys.readouterr().err


def test_cli_exports_the_features_backbone_with_its_four_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = timm.create_model("test_mlla", features_only=True).eval()
    ckpt = mlla.save_state_dict(mlla.checkpoint.unwrap_features_only(backbone).state_dict(), tmp_path / "b.safetensors")
    out = tmp_path / "backbone.pt2"
    rc = main(["export", "--model", "test_mlla", "--features", "--checkpoint", str(ckpt), "--format", "torch-export",
               "--output", str(out), "--example-size", "64", "--check-sizes", "64"])
    assert rc == 0 and "outputs match PyTorch" in capsys.readouterr().out
    run = export_module.load_exported(out)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = backbone(x)
    got = run(x)
    assert len(got) == len(expected) == 4
    assert [tuple(g.shape) for g in got] == [(2, c, 96 // s, 128 // s) for c, s in zip((16, 32, 64, 128), (4, 8, 16, 32))]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


def test_cli_check_sizes_none_and_output_checked_before_export(traced, tmp_path, monkeypatch, capsys):
    model, program = traced
    monkeypatch.setattr(export_module, "export_program", lambda *a, **k: program)
    out = tmp_path / "m.pt2"
    rc = main(["export", "--model", "test_mlla", "--num-classes", "5", "--format", "torch-export", "--output", str(out),
               "--example-size", "64", "--check-sizes", "none"])
    captured = capsys.readouterr()
    assert rc == 0 and out.is_file() and "match PyTorch" not in captured.out, captured.err

    def no_export(*a, **k):
        raise AssertionError("the output path must be refused before exporting")

    monkeypatch.setattr(export_module, "export_program", no_export)
    for bad, message in ((tmp_path, "is a folder"), (out / "sub.onnx", "is a file")):
        rc = main(["export", "--model", "test_mlla", "--output", str(bad)])
        assert rc == 2 and message in capsys.readouterr().err
