"""UperNet segmentation (mlla.dense): model, ADE20K-layout data, metrics, inference, the task in
the one training engine, the `mlla seg` commands, and bad input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlla
import mlla.cli
from mlla.checkpoint import CheckpointError
from mlla.dense import upernet
from mlla.tasks.segmentation.ade import IGNORE_INDEX, SegmentationDataset, build_seg_transform, collate_segmentation
from mlla.tasks.segmentation.demo import SEG_DEMO_CLASSES, make_seg_demo_dataset
from mlla.tasks.segmentation.evaluate import (
    MS_RATIOS, confusion_matrix, evaluate_segmentation, predict_probs, segmentation_metrics, slide_logits, whole_logits,
)
from mlla.engine import fit
from mlla.tasks.segmentation.settings import SegmentationConfig
from mlla.data import build_loader

from conftest import reference_case

TINY = dict(channels=16, aux_channels=8)


def _tiny_model(num_classes: int = 4, **kw) -> torch.nn.Module:
    return upernet("test_mlla", num_classes, **TINY, **kw)


def _write_pair(root: Path, split: str, name: str, image: np.ndarray, labels: np.ndarray | None) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.png")
    if labels is not None:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_seg_demo_dataset(tmp_path_factory.mktemp("segdemo"), train_images=8, val_images=3, img_size=(40, 48), progress=False)


def test_odd_size_gives_logits_at_the_input_size_and_train_mode_gives_main_and_aux():
    model = _tiny_model(5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 421, 637))
    assert out.shape == (1, 5, 421, 637)
    model.train()
    main, aux = model(torch.randn(2, 3, 64, 96))
    assert main.shape == aux.shape == (2, 5, 64, 96)
    assert upernet("test_mlla", 5, aux_head=False, **TINY).train()(torch.randn(2, 3, 64, 64))[1] is None


def test_paper_setting_layout():
    with torch.device("meta"):
        model = upernet("mlla_base", 150)
    head = model.decode_head
    assert head.fusion_block[0].out_channels == 512 and len(head.psp.blocks) == 4  # PPM bins 1, 2, 3, 6
    assert model.auxiliary_head.conv[0].in_channels == 384 and model.auxiliary_head.conv[0].out_channels == 256
    assert all(isinstance(n, torch.nn.Identity) for n in head.feature_norms)  # the backbone's norm0..3 normalise
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(128, abs=1)  # paper: 128M


def test_mlla_models_upernet_figures_match_the_papers():
    from mlla.models import PAPER_RESULTS
    from mlla.tasks.segmentation.model import upernet_stats

    stats, paper = upernet_stats("mlla_base"), PAPER_RESULTS["upernet_mlla_base"]
    assert stats["gmacs"] == pytest.approx(paper["gmacs"], rel=0.01)  # 512x2048, eval mode
    assert stats["params_m"] == pytest.approx(paper["params_m"], rel=0.01)


def test_small_images_are_refused_by_the_model_and_padded_by_inference():
    model = _tiny_model().eval()
    with pytest.raises(ValueError, match=r"H, W >= 32.*pad or resize"):
        model(torch.randn(1, 3, 20, 40))
    with torch.no_grad():
        assert whole_logits(model, torch.randn(1, 3, 9, 13)).shape == (1, 4, 9, 13)
        probs = predict_probs(model, torch.randn(3, 9, 13), num_classes=4, scale=(64, 32), ratios=MS_RATIOS, flip=True)
    assert probs.shape == (4, 9, 13) and torch.allclose(probs.sum(0), torch.ones(9, 13))


def test_sliding_window_equals_whole_image_where_it_must():
    model = _tiny_model().eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(slide_logits(model, x, 4, crop_size=96, stride=64), whole_logits(model, x))  # one window
    pointwise = torch.nn.Conv2d(3, 4, 1)  # no context: every window agrees with the whole image
    x = torch.randn(2, 3, 100, 130)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(pointwise, x, 4, crop_size=48, stride=32), pointwise(x))


def test_miou_equals_the_hand_computed_value():
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, IGNORE_INDEX], [2, 1, 0]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm)
    # IoU: class 0 2/2, class 1 1/(2+1-1), class 2 1/(1+2-1); class 3 is absent and not averaged.
    assert m["mIoU"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert m["mAcc"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 5)
    assert np.isnan(m["IoU"][3]) and m["IoU"][:3] == pytest.approx([100, 50, 50])


class _Constant(torch.nn.Module):
    """Predicts class ``k`` everywhere."""

    def __init__(self, num_classes: int, k: int) -> None:
        super().__init__()
        self.num_classes, self.k = num_classes, k

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        out[:, self.k] = 1.0
        return out


def test_evaluate_returns_the_documented_structure_with_hand_computed_scores(tmp_path):
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, (33, 41)), rng.integers(0, 4, (40, 35))]  # 0 = unlabelled, classes 1..3
    for i, lab in enumerate(labels):
        _write_pair(tmp_path, "validation", f"im{i}", rng.integers(0, 255, (*lab.shape, 3), dtype=np.uint8), lab)
    ds = SegmentationDataset(tmp_path, "validation", build_seg_transform(False), num_classes=3)
    loader = build_loader(ds, 2, is_training=False, workers=0, seed=0, collate_fn=collate_segmentation)
    result = evaluate_segmentation(_Constant(3, 1), loader, 3, progress=False, scale=(64, 32))
    assert set(result) == {"mIoU", "mAcc", "aAcc", "images", "skipped"}
    flat = np.concatenate([lab.ravel() for lab in labels])
    labelled, hits = (flat > 0).sum(), (flat == 2).sum()  # predicted class 1 = file label 2
    assert result["aAcc"] == pytest.approx(100 * hits / labelled)
    assert result["mIoU"] == pytest.approx(100 * hits / labelled / 3)  # classes 0 and 2: IoU 0
    assert result["mAcc"] == pytest.approx(100 / 3)
    assert (result["images"], result["skipped"]) == (2, 0)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluation_does_not_depend_on_the_batch_size_on_mixed_image_sizes(tmp_path, mode):
    from mlla.tasks.segmentation.evaluate import segmentation_confusion

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(33, 41), (40, 35), (48, 48), (30, 60), (41, 33)]):
        _write_pair(tmp_path, "validation", f"im{i}", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.integers(0, 4, (h, w)))
    ds = SegmentationDataset(tmp_path, "validation", build_seg_transform(False), num_classes=3)
    torch.manual_seed(0)
    model = _tiny_model(3).eval()
    confusion = {}
    for batch in (1, 4):  # each image is inferred at its own size, whatever its batch
        loader = build_loader(ds, batch, is_training=False, workers=0, seed=0, collate_fn=collate_segmentation)
        confusion[batch] = segmentation_confusion(model, loader, 3, progress=False, scale=(64, 32), mode=mode, crop_size=32, stride=21)
    assert confusion[1][1:] == confusion[4][1:] == (5, 0)
    assert len(confusion[1][0].nonzero()) > 1  # more than one class predicted: a real comparison
    assert torch.equal(confusion[1][0], confusion[4][0])


def test_training_steps_lower_the_loss(demo):
    from mlla.tasks.segmentation.task import SegmentationTask

    cfg = SegmentationConfig(model="test_mlla", seg_channels=16, seg_aux_channels=8, seg_crop_size=32,
                      seg_scale=(64, 32), train_split="training", val_split="validation")
    task = SegmentationTask(cfg)
    train_set, val_set = task.build_datasets(demo, mlla.engine.distributed.DistEnv())
    assert task.classes == list(SEG_DEMO_CLASSES) and val_set is not None
    model = task.build_model().train()
    images, masks = task.to_device(*task.collate([train_set[i] for i in range(8)])[:2], torch.device("cpu"))
    assert images.shape == (8, 3, 32, 32) and masks.shape == (8, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, parts = task.training_loss(model, images, masks, ema=None, epoch=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"loss_main", "loss_aux"}
    assert loss.item() == pytest.approx(parts["loss_main"] + 0.4 * parts["loss_aux"], rel=1e-5)
    assert losses[-1] < 0.6 * losses[0]


def test_augmentation_moves_image_and_mask_together(demo):
    tf = build_seg_transform(True, crop_size=32, scale=(64, 32), photometric=False)
    ds = SegmentationDataset(demo, "training", tf, num_classes=6, seed=3)
    raw = SegmentationDataset(demo, "training", None, num_classes=6)
    image, mask, _ = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(raw[0][1].unique().tolist())  # nearest resize: no new labels
    # Pixels of one class share a hue in the demo: the mask still marks the same colours.
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None]
    pix = image.flatten(1) * std + mean
    for k in mask.unique().tolist():
        if k in (1, 2) and (mask == k).sum() > 20:  # disc (red) and box (green)
            sel = pix[:, (mask == k).flatten()]
            assert sel[k - 1].mean() > sel[2].mean() + 0.1
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)  # a new epoch, new crops
    ds.set_epoch(0)
    assert torch.equal(ds[0][0], image)  # a pure function of (seed, epoch, index)


def test_authors_backbone_layout_loads_with_no_missing_keys(tmp_path):
    case = reference_case("det_small_97x150")
    sd = {f"backbone.{k}": v for k, v in case["state_dict"].items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)  # mmseg heads: ignored
    sd["auxiliary_head.conv_seg.weight"] = torch.zeros(150, 256, 1, 1)
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": sd, "meta": {"iter": 160000}}, path)
    model = upernet("test_mlla", 150, backbone_checkpoint=path, **TINY, **case["config"]).eval()
    with torch.no_grad():
        feats = model.backbone(case["input"])
    for i, f in enumerate(feats):
        assert (f - case["outputs"][f"output.{i}"]).abs().max().item() < 1e-5, f"stage {i}"
    del sd["backbone.norm2.weight"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys.*stage_norms\.2\.weight"):
        upernet("test_mlla", 150, backbone_checkpoint=path, **TINY, **case["config"])


def test_classification_checkpoint_initialises_the_backbone(tmp_path):
    classifier = mlla.create_model("test_mlla", num_classes=10)
    path = tmp_path / "cls.pth"
    torch.save({"model": classifier.state_dict()}, path)
    model = upernet("test_mlla", 4, backbone_checkpoint=path, **TINY)
    torch.testing.assert_close(model.backbone.model.stages[3].blocks[0].mlp.fc1.weight,
                               classifier.stages[3].blocks[0].mlp.fc1.weight)
    weights = {k: v for k, v in classifier.state_dict().items() if not k.startswith("stages.1.")}
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['stages\.1\."):
        upernet("test_mlla", 4, backbone_checkpoint=path, **TINY)


def _seg_config(data: Path, output: Path, **kw) -> SegmentationConfig:
    base = dict(task="segmentation", model="test_mlla", data_dir=str(data), output=str(output), epochs=2, batch_size=4,
                workers=0, progress=False, amp=False, lr=2e-3, warmup_steps=1, sched="poly", seg_channels=16,
                seg_aux_channels=8, seg_crop_size=32, seg_scale=(64, 32), train_split="training",
                val_split="validation", model_ema=False, drop_path=0.0)
    return SegmentationConfig(**{**base, **kw})


class _Killed(Exception):
    """Stands for kill -9: the process ends at once, no handler saves anything."""


@pytest.mark.slow  # about 25 s: three short runs
def test_resume_after_a_kill_continues_a_segmentation_run(demo, tmp_path):
    straight = fit(_seg_config(demo, tmp_path / "a"))
    assert straight["status"] == "finished" and "val_mIoU" in straight["last"]

    out = tmp_path / "b"

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        fit(_seg_config(demo, out, save_every_steps=1), on_step=kill_at_3)  # last.pth: step 2 (step 3's save never ran)
    assert torch.load(out / "last.pth", weights_only=True)["global_step"] == 2
    resumed = fit(_seg_config(demo, out, save_every_steps=1, resume="auto"))
    assert resumed["status"] == "finished"
    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (tmp_path / "a", out))
    assert a["global_step"] == b["global_step"] == 4 and b["seg_classes"] == list(SEG_DEMO_CLASSES)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and {"val_mIoU", "val_mAcc", "val_aAcc", "train_loss_aux"} <= set(rows[0])


@pytest.mark.slow  # about 15 s: an eager and a compiled run
def test_a_compiled_segmentation_run_trains_as_the_eager_one(demo, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # SGD: AdamW would turn last-bit gradient differences into visible ones where gradients are near zero
    fit(_seg_config(demo, tmp_path / "eager", opt="sgd"))
    fit(_seg_config(demo, tmp_path / "compiled", opt="sgd", compile=True, compile_backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("eager", "compiled")]
    for x, y in zip(*rows, strict=True):
        for key in ("train_loss", "train_loss_main", "train_loss_aux"):
            assert y[key] == pytest.approx(x[key], rel=1e-4), key
    # mIoU is left out: on a barely trained model last-bit differences flip near-tied pixels
    a, b = (torch.load(tmp_path / run / "last.pth", weights_only=True)["model"] for run in ("eager", "compiled"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow  # about 20 s on a shared 2-core machine: a short run, multi-scale sliding eval, predict
def test_seg_commands_eval_and_predict(demo, tmp_path, capsys):
    out = tmp_path / "run"
    fit(_seg_config(demo, out, epochs=1))
    capsys.readouterr()
    assert mlla.cli.main(["seg", "eval", "--checkpoint", str(out / "last.pth"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["mIoU"] == pytest.approx(row["val_mIoU"]) and result["images"] == 3
    assert len(result["IoU"]) == len(SEG_DEMO_CLASSES) and result["classes"] == list(SEG_DEMO_CLASSES)
    assert mlla.cli.main(["seg", "eval", "--checkpoint", str(out / "last.pth"), "--multi-scale", "--mode", "slide",
                          "--workers", "0"]) == 0
    assert "multi-scale + flip slide: mIoU" in capsys.readouterr().out
    pic_dir = tmp_path / "pics"
    pic_dir.mkdir()
    Image.open(next((demo / "images" / "validation").iterdir())).save(pic_dir / "scene.jpg")
    (pic_dir / "broken.jpg").write_bytes(b"no image")
    assert mlla.cli.main(["seg", "predict", str(pic_dir), "--checkpoint", str(out / "best.pth")]) == 0
    assert Image.open(pic_dir / "scene_seg.png").size[0] > 100 and not (pic_dir / "broken_seg.png").exists()
    assert "1 of 2 images could not be read" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture()
def bad_data(tmp_path):
    """Validation split: 2 good pairs, a map of another size, a label beyond the classes, an
    image without a map, a corrupt image, and an image smaller than the backbone's stride."""
    rng = np.random.default_rng(1)

    def img(h, w):
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    for split in ("training", "validation"):
        _write_pair(tmp_path, split, "good0", img(40, 50), rng.integers(0, 4, (40, 50)))
        _write_pair(tmp_path, split, "good1", img(36, 44), rng.integers(0, 4, (36, 44)))
        _write_pair(tmp_path, split, "wrong_size", img(40, 50), rng.integers(0, 4, (30, 50)))
        _write_pair(tmp_path, split, "label_too_big", img(40, 50), np.full((40, 50), 9))
        _write_pair(tmp_path, split, "no_map", img(40, 50), None)
        _write_pair(tmp_path, split, "corrupt", img(40, 50), rng.integers(0, 4, (40, 50)))
        (tmp_path / "images" / split / "corrupt.png").write_bytes(b"not a png")
    _write_pair(tmp_path, "validation", "tiny", img(9, 13), rng.integers(0, 4, (9, 13)))
    return tmp_path


def test_bad_samples_are_counted_and_skipped_in_evaluation(bad_data, caplog):
    with caplog.at_level(logging.WARNING):
        ds = SegmentationDataset(bad_data, "validation", build_seg_transform(False), num_classes=3)
        assert len(ds) == 6 and ds.missing == [str(bad_data / "images" / "validation" / "no_map.png")]
        # (the engine's loaders stop a pass with more than 1% failed samples; counted here instead)
        loader = build_loader(ds, 4, is_training=False, workers=0, seed=0, collate_fn=collate_segmentation,
                              max_failed_fraction=None)
        result = evaluate_segmentation(_tiny_model(3).eval(), loader, 3, progress=False, scale=(64, 32))
    assert (result["images"], result["skipped"]) == (3, 3)  # good0, good1, tiny (padded); 3 bad ones
    log = caplog.text
    assert "left out 1 images without a label map" in log
    assert "is 50x30 but the image is 50x40" in log
    assert "holds label 9, beyond the 3 classes" in log and "--num-classes" in log
    assert "corrupt.png: unreadable" in log


def test_unnamed_classes_are_called_by_their_value_in_the_annotation_files(tmp_path):
    from mlla.engine.distributed import DistEnv
    from mlla.tasks.segmentation.task import SegmentationTask

    rng = np.random.default_rng(0)
    _write_pair(tmp_path, "training", "a", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), rng.integers(0, 4, (40, 40)))
    for reduce_zero_label, names in ((True, ["label 1", "label 2", "label 3"]), (False, ["label 0", "label 1", "label 2"])):
        task = SegmentationTask(SegmentationConfig(num_classes=3, train_split="training",
                                            seg_reduce_zero_label=reduce_zero_label))
        task.build_datasets(tmp_path, DistEnv())
        assert task.classes == names  # the legend of `mlla seg predict` names what the files hold


def test_bad_samples_are_replaced_and_counted_in_training(bad_data):
    tf = build_seg_transform(True, crop_size=32, scale=(64, 32))
    ds = SegmentationDataset(bad_data, "training", tf, num_classes=3, replace_bad=True)
    batch = collate_segmentation([ds[i] for i in range(len(ds))])
    names = [Path(p).stem for p, _ in ds.samples]
    assert len(batch[0]) == len(ds) and batch[2] == sum(n in ("corrupt", "label_too_big", "wrong_size") for n in names)
    assert all(x.shape == (3, 32, 32) for x in batch[0])


def test_a_split_with_nothing_usable_is_a_clear_error(tmp_path):
    _write_pair(tmp_path, "training", "only_image", np.zeros((40, 40, 3), np.uint8), None)
    with pytest.raises(ValueError, match="no image in images/training has a label map"):
        SegmentationDataset(tmp_path, "training", None, num_classes=3)
    with pytest.raises(FileNotFoundError, match="expected the ADE20K layout"):
        SegmentationDataset(tmp_path, "validation", None, num_classes=3)
    _write_pair(tmp_path, "training", "all_too_big", np.zeros((40, 40, 3), np.uint8), np.full((40, 40), 7))
    ds = SegmentationDataset(tmp_path, "training", None, num_classes=3, replace_bad=True)
    with pytest.raises(RuntimeError, match="cannot be used.*--num-classes"):
        ds[0]
