"""``mlla validate``: the authors' checkpoint layout, our training checkpoints (raw and EMA),
and clear errors for checkpoints that do not fit the data."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlla
from mlla.cli import main
from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.engine import fit
from mlla.tasks.classification.settings import ClassificationConfig

from conftest import REFERENCE_DIR as REFERENCE
SMALL = dict(embed_dim=32, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8))  # manifest.json, cls_small_96
SMALL_ARGS = ["--model-kwargs", "embed_dim=32", "depths=1,2,2,1", "num_heads=1,2,4,8"]


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory) -> Path:
    """The reference weights in the authors' training-checkpoint layout: a ``.pth`` with ``model``."""
    if not (REFERENCE / "cls_small_96.safetensors").is_file():
        pytest.skip(f"reference fixtures not found in {REFERENCE}")
    from safetensors.torch import load_file

    tensors = load_file(str(REFERENCE / "cls_small_96.safetensors"))
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    path = tmp_path_factory.mktemp("authors") / "ckpt_epoch_299.pth"
    torch.save({"model": state, "epoch": 299, "max_accuracy": 0.0}, path)
    reference = mlla.create_model("mlla_tiny", num_classes=10, **SMALL).eval()
    mlla.load_checkpoint(reference, path)
    with torch.no_grad():  # the file is the authors' model: it reproduces their output
        torch.testing.assert_close(reference(tensors["input"]), tensors["output"], atol=1e-4, rtol=0)
    return path


def _validate(capsys, *argv: str) -> dict:
    assert main(["validate", *argv, "--json", "-j", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_validate_authors_checkpoint_reports_what_the_model_computes(authors_checkpoint, tmp_path, capsys):
    model = mlla.create_model("mlla_tiny", num_classes=10, **SMALL).eval()
    mlla.load_checkpoint(model, authors_checkpoint)
    mean, std = torch.tensor(model.pretrained_cfg["mean"]), torch.tensor(model.pretrained_cfg["std"])

    def logits(paths: list[Path]) -> torch.Tensor:  # 96 px images, crop 1.0: only normalisation
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255) for p in paths])
        with torch.no_grad():
            return model(((x - mean) / std).permute(0, 3, 1, 2))

    rng = np.random.default_rng(0)
    staging = tmp_path / "staging"
    staging.mkdir()
    images = []
    for i in range(24):
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)  # smooth random images
        images.append(staging / f"{i}.png")
        Image.fromarray(pixels).resize((96, 96), Image.BILINEAR).save(images[-1])
    predicted = logits(images).argmax(1)
    for i, (path, p) in enumerate(zip(images, predicted.tolist())):
        label = p if i % 3 else (p + 1) % 10  # two thirds labelled as the model predicts
        target = tmp_path / "data" / "val" / f"class{label}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    for c in range(10):
        (tmp_path / "data" / "val" / f"class{c}").mkdir(exist_ok=True)

    result = _validate(capsys, "--model", "mlla_tiny", *SMALL_ARGS, "--data-dir", str(tmp_path / "data"),
                       "--checkpoint", str(authors_checkpoint), "--img-size", "96", "--crop-pct", "1.0")
    files = sorted((tmp_path / "data" / "val").rglob("*.png"))
    labels = torch.tensor([int(f.parent.name.removeprefix("class")) for f in files])
    out = logits(files)
    top1 = 100 * (out.argmax(1) == labels).float().mean().item()
    top5 = 100 * (out.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert result["images"] == 24 and result["skipped"] == 0
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, labels).item(), rel=1e-5)


def test_validate_refuses_a_checkpoint_with_another_class_count(authors_checkpoint, tmp_path, capsys):
    data = make_demo_dataset(tmp_path, 1, 1, classes=DEMO_CLASSES[:3], progress=False)
    argv = ["validate", "--model", "mlla_tiny", *SMALL_ARGS, "--data-dir", str(data), "--checkpoint", str(authors_checkpoint)]
    assert main(argv) == 2
    assert "different number of classes" in capsys.readouterr().err
    assert main(argv + ["--use-ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def test_validate_our_checkpoint_matches_the_training_run_raw_and_ema(tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "data", 4, 3, classes=DEMO_CLASSES[:3], progress=False)
    out = tmp_path / "run"
    cfg = ClassificationConfig(model="test_mlla", model_kwargs={"embed_dim": 8}, data_dir=str(data), output=str(out),
                      epochs=1, batch_size=4, img_size=32, workers=0, progress=False, amp=False, lr=1e-3,
                      crop_pct=1.0, model_ema_decay=0.5, model_ema_decay_batch=0)
    row = fit(cfg)["last"]
    args = ["--config", str(out / "config.yaml"), "--data-dir", str(data), "--checkpoint", str(out / "last.pth")]
    raw = _validate(capsys, *args)
    ema = _validate(capsys, *args, "--use-ema")
    assert raw["model"] == "test_mlla" and raw["images"] == 9
    assert raw["top1"] == pytest.approx(row["val_top1"]) and raw["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert ema["top1"] == pytest.approx(row["ema_top1"]) and ema["top5"] == pytest.approx(row["ema_top5"])
    assert ema["ema"] and abs(ema["loss"] - raw["loss"]) > 1e-6  # other weights: the EMA ones, not the raw ones


def test_validate_attention_backend_gives_the_same_result_and_is_refused_where_it_cannot_apply(tmp_path, capsys, monkeypatch):
    data = make_demo_dataset(tmp_path / "data", 2, 3, classes=DEMO_CLASSES[:3], progress=False)
    checkpoint = tmp_path / "model.pth"
    torch.save(mlla.create_model("test_mlla", num_classes=3).state_dict(), checkpoint)
    args = ["--model", "test_mlla", "--data-dir", str(data), "--checkpoint", str(checkpoint), "--img-size", "32"]
    torch_form = _validate(capsys, *args, "--attention-backend", "torch")
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":  # conftest, without CUDA
        kernel = _validate(capsys, *args, "--attention-backend", "triton")
        assert kernel["loss"] == pytest.approx(torch_form["loss"], rel=1e-5) and kernel["top1"] == torch_form["top1"]
    assert mlla.ops.get_attention_backend() == "auto"
    # The kernel outside CUDA (without Triton's interpreter), and a model without MLLA's attention.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["validate", *args, "--attention-backend", "triton", "--device", "cpu"]) == 2
    assert "--attention-backend triton" in capsys.readouterr().err
    torch.save(mlla.create_model("ablation_baseline", num_classes=3).state_dict(), checkpoint)
    assert main(["validate", *args[:1], "ablation_baseline", *args[2:], "--attention-backend", "torch"]) == 2
    assert "applies to models with MLLA's attention" in capsys.readouterr().err
