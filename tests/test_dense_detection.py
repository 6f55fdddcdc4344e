"""Mask R-CNN on MLLA (mlla.dense): model, backbone loading, COCO data and evaluation, the
detection task in the one trainer, and the `mlla det` command. Small heads and tiny images."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlla
from mlla.checkpoint import CheckpointError
from mlla.dense import CocoDetection, coco_evaluate, load_backbone_checkpoint, mask_rcnn
from mlla.tasks.detection.coco import collate_detection, detections_to_coco
from mlla.tasks.detection.task import evaluate_detector
from mlla.data import build_loader

from conftest import reference_case

# Slim heads so that the tests stay fast; the architecture is the paper's otherwise.
SMALL = dict(fpn_channels=32, mask_head_channels=32, box_representation_size=64)


def small_rcnn(num_classes: int = 3, **kwargs):
    return mask_rcnn("test_mlla", num_classes, **dict(SMALL, min_size=64, max_size=96, **kwargs))


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories=((1, "a"), (5, "b")), split="train", draw=True) -> Path:
    """A COCO split under ``root``; each image is drawn (noise) unless ``draw`` is False or ``file`` says otherwise."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for img in images:
        if draw and img.pop("draw", True):
            size = img.pop("file_size", (img["width"], img["height"]))
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / img["file_name"])
    for i, a in enumerate(annotations):
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        x, y, w, h = a["bbox"]
        a.setdefault("segmentation", [[x, y, x + w, y, x + w, y + h, x, y + h]])
        a.setdefault("area", w * h)
    data = dict(images=images, annotations=annotations, categories=[dict(id=i, name=n) for i, n in categories])
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def img(i: int, w: int = 64, h: int = 48, **kw) -> dict:
    return dict(id=i, file_name=f"{i}.png", width=w, height=h, **kw)


# ------------------------------------------------------------------------------------ model
def test_a_few_training_steps_lower_the_loss():
    model = small_rcnn(2).train()
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 40)]
    masks = [torch.zeros(1, 48, 64, dtype=torch.uint8), torch.zeros(1, 64, 40, dtype=torch.uint8)]
    masks[0][0, 10:30, 8:40] = 1
    masks[1][0, 20:50, 5:30] = 1
    targets = [
        dict(boxes=torch.tensor([[8.0, 10, 40, 30]]), labels=torch.tensor([1]), masks=masks[0]),
        dict(boxes=torch.tensor([[5.0, 20, 30, 50]]), labels=torch.tensor([2]), masks=masks[1]),
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss_dict = model(images, targets)
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(loss_dict.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("size", [(800, 1333), (421, 637)])
def test_large_and_odd_images_go_through_the_detector(size):
    model = mask_rcnn("test_mlla", 2, **SMALL, box_detections_per_img=5, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20).eval()
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333  # the paper's test scale
    with torch.no_grad():
        out = model([torch.rand(3, *size)])[0]
    assert out["boxes"].shape[1] == 4 and out["masks"].shape[-2:] == size  # in the input's pixel coordinates
    features = model.backbone(torch.rand(1, 3, 800, 1344))  # the padded batch of a 1333x800 image
    assert list(features) == ["0", "1", "2", "3", "pool"]  # P2-P5 and P6
    assert [f.shape[-2] for f in features.values()] == [200, 100, 50, 25, 13]
    assert all(f.shape[1] == SMALL["fpn_channels"] for f in features.values())


def test_multi_scale_training_sizes_and_anchors_are_the_papers():
    model = mask_rcnn("test_mlla", 80, min_size=tuple(range(480, 801, 32)), **SMALL)
    assert model.transform.min_size == tuple(range(480, 801, 32))
    gen = model.rpn.anchor_generator
    assert gen.sizes == ((32,), (64,), (128,), (256,), (512,)) and gen.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert model.roi_heads.box_predictor.cls_score.out_features == 81  # 80 classes + background
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="num_classes"):
        mask_rcnn("test_mlla", 0)


# ---------------------------------------------------------------------------- backbone loading
def test_authors_detection_checkpoint_layout_loads_with_no_missing_backbone_keys(tmp_path):
    case = reference_case("det_small_97x150")
    # As in the authors' mmdet checkpoints: backbone.* (norm0..norm3 included) beside neck and heads.
    state = {f"backbone.{k}": v for k, v in case["state_dict"].items()}
    assert any(k.startswith("backbone.norm3.") for k in state)
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 4)
    state["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    path = tmp_path / "authors_det.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)
    model = mask_rcnn("test_mlla", 3, backbone_checkpoint=path, backbone_kwargs=case["config"], **SMALL).eval()
    body = model.backbone.body
    with torch.no_grad():
        outs = body(case["input"])
    for i, out in enumerate(outs):  # the loaded backbone reproduces the authors' stage outputs
        torch.testing.assert_close(out, case["outputs"][f"output.{i}"], atol=1e-5, rtol=0)


def test_classification_checkpoint_initialises_the_backbone_and_other_sizes_are_refused(tmp_path):
    classifier = mlla.create_model("test_mlla", num_classes=7)
    path = tmp_path / "cls.pth"
    torch.save({"model": classifier.state_dict()}, path)
    model = mask_rcnn("test_mlla", 2, backbone_checkpoint=path, **SMALL)
    inner = model.backbone.body.model
    torch.testing.assert_close(inner.stem.conv1.conv.weight, classifier.stem.conv1.conv.weight)
    torch.testing.assert_close(inner.stages[3].blocks[0].attn.qk.weight, classifier.stages[3].blocks[0].attn.qk.weight)
    other = tmp_path / "other.pth"
    torch.save(mlla.create_model("test_mlla", embed_dim=24, num_heads=(1, 2, 4, 8)).state_dict(), other)
    with pytest.raises(CheckpointError, match="shape"):
        mask_rcnn("test_mlla", 2, backbone_checkpoint=other, **SMALL)


# ---------------------------------------------------------------------------------- evaluation
def _gt(images, annotations, categories=((1, "a"), (5, "b"))):
    from mlla.tasks.detection.coco import _gt_annotation, _quiet_coco

    annotations = [_gt_annotation(a, i) for i, a in enumerate(annotations)]
    return _quiet_coco(dict(images=images, annotations=annotations, categories=[dict(id=i, name=n) for i, n in categories]))


def test_coco_ap_equals_hand_computed_values():
    gt = _gt([img(1, 200, 200)], [
        dict(image_id=1, category_id=1, bbox=[10, 10, 50, 50]),
        dict(image_id=1, category_id=1, bbox=[90, 90, 100, 100]),
    ])
    perfect = [dict(image_id=1, category_id=1, bbox=[10, 10, 50, 50], score=0.9),
               dict(image_id=1, category_id=1, bbox=[90, 90, 100, 100], score=0.8)]
    metrics = coco_evaluate(gt, {"bbox": perfect})
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["bbox_AP50"] == pytest.approx(100.0)
    assert metrics["bbox_APs"] == -1.0  # no small objects in the ground truth
    # One of the two objects found, no false positive: precision 1 up to recall 0.5, then 0:
    # COCO's 101-point interpolated AP is 51/101 at every IoU threshold.
    half = coco_evaluate(gt, {"bbox": perfect[:1]})
    assert half["bbox_AP"] == pytest.approx(100 * 51 / 101)
    assert half["bbox_APm"] == pytest.approx(100.0) and half["bbox_APl"] == pytest.approx(0.0)
    # A box of IoU 0.68 with its object, scored above the other (perfect) one: a true positive at
    # IoU thresholds 0.50-0.65 (4 of 10); above them a false positive ranked first, so precision
    # is 1/2 at recall 1/2 and no more recall: AP 0.5 * 51/101 there.
    shifted = [dict(image_id=1, category_id=1, bbox=[10, 10, 50, 34], score=0.9), perfect[1]]
    partial = coco_evaluate(gt, {"bbox": shifted})
    assert partial["bbox_AP50"] == pytest.approx(100.0)
    assert partial["bbox_AP75"] == pytest.approx(100 * 0.5 * 51 / 101)
    assert partial["bbox_AP"] == pytest.approx((4 * 100 + 6 * 100 * 0.5 * 51 / 101) / 10)
    assert set(coco_evaluate(gt, {"bbox": [], "segm": []})) == {f"{k}_{m}" for k in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert coco_evaluate(gt, {"bbox": []})["bbox_AP"] == 0.0


class _Oracle(torch.nn.Module):
    """Returns each image's ground truth as detections (score 1): a perfect detector."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.dataset = dataset
        self.calls = 0
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        out = []
        for im in images:
            index = self.calls
            self.calls += 1
            _, target, _ = self.dataset[index]
            n = len(target["labels"])
            out.append(dict(boxes=target["boxes"], labels=target["labels"], scores=torch.ones(n),
                            masks=target["masks"][:, None].float()))
        return out


def test_evaluate_detector_gives_100_for_a_perfect_detector_in_the_documented_structure(tmp_path):
    images = [img(1), img(2), img(3)]
    anns = [dict(image_id=1, category_id=1, bbox=[4, 4, 30, 20]), dict(image_id=1, category_id=5, bbox=[40, 10, 20, 30]),
            dict(image_id=2, category_id=5, bbox=[2, 2, 50, 40])]
    ann = write_coco(tmp_path, images, anns, split="val")
    dataset = CocoDetection(ann, tmp_path / "val")
    assert len(dataset) == 3  # the image without annotations is kept for evaluation
    loader = build_loader(dataset, 2, is_training=False, workers=0, seed=0, collate_fn=collate_detection)
    metrics = evaluate_detector(_Oracle(dataset), loader, progress=False)
    expected = {f"{k}_{m}" for k in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")} | {"images", "skipped"}
    assert set(metrics) == expected
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["images"] == 3 and metrics["skipped"] == 0


def test_detections_map_labels_back_to_the_original_category_ids():
    det = dict(boxes=torch.tensor([[1.0, 2, 11, 22]]), labels=torch.tensor([2]), scores=torch.tensor([0.5]),
               masks=torch.zeros(1, 1, 30, 30))
    det["masks"][0, 0, 2:22, 1:11] = 0.9
    boxes, masks = detections_to_coco([(7, det)], {1: 1, 2: 5})
    assert boxes == [dict(image_id=7, category_id=5, bbox=[1.0, 2.0, 10.0, 20.0], score=0.5)]
    from pycocotools import mask as mask_utils

    assert masks[0]["category_id"] == 5 and mask_utils.area(masks[0]["segmentation"]) == 200


def _mixed_size_val_set(root: Path) -> CocoDetection:
    sizes = [(64, 48), (48, 64), (80, 60), (64, 48), (56, 72), (48, 64), (64, 48), (72, 40)]
    images = [img(i + 1, w, h) for i, (w, h) in enumerate(sizes)]
    anns = [dict(image_id=i + 1, category_id=(1, 5)[i % 2], bbox=[4, 4, w // 2, h // 2]) for i, (w, h) in enumerate(sizes)]
    return CocoDetection(write_coco(root, images, anns, split="val"), root / "val")


def test_detections_do_not_depend_on_the_batch_size_on_mixed_image_sizes(tmp_path):
    from mlla.tasks.detection.task import detect_by_size

    torch.manual_seed(0)
    model = small_rcnn(2, box_score_thresh=0.0).eval()
    dataset = _mixed_size_val_set(tmp_path)
    images = [dataset[i][0] for i in range(len(dataset))]
    with torch.no_grad():
        alone = [model([im])[0] for im in images]
        # What the grouping prevents: in one padded batch, the backbone's global attention sees
        # the padding and an image's detections change.
        padded = model(images[:2])
        assert not torch.allclose(padded[0]["scores"][:5], alone[0]["scores"][:5], atol=1e-4)
        for batch in (2, 4):
            grouped = [out for i in range(0, len(images), batch) for out in detect_by_size(model, images[i:i + batch])]
            for a, b in zip(alone, grouped):
                assert len(a["scores"]) > 0 and a["boxes"].shape == b["boxes"].shape
                # Equal up to float32 rounding of batched matrix products.
                for key in ("boxes", "scores", "masks"):
                    torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
                assert torch.equal(b["labels"], a["labels"])
    metrics = {}
    for batch in (1, 4):
        loader = build_loader(dataset, batch, is_training=False, workers=0, seed=0, collate_fn=collate_detection)
        metrics[batch] = evaluate_detector(model, loader, progress=False)
    assert metrics[1]["images"] == metrics[4]["images"] == 8
    for key, value in metrics[1].items():
        assert metrics[4][key] == pytest.approx(value, abs=1e-6), key


# ----------------------------------------------------------------------------------- bad input
def test_bad_coco_input_is_counted_and_cleaned(tmp_path, caplog):
    images = [img(1), img(2), img(3), img(4, draw=False), img(5, 20, 12), img(6)]
    anns = [
        dict(image_id=1, category_id=1, bbox=[50, 30, 40, 40]),   # reaches outside: clipped to 50..64, 30..48
        dict(image_id=1, category_id=5, bbox=[10, 10, 0, 20]),    # zero width: dropped
        dict(image_id=1, category_id=5, bbox=[70, 60, 10, 10]),   # entirely outside: dropped
        dict(image_id=1, category_id=1, bbox=[5, 5, 10, 10], iscrowd=1),  # crowd: not a target
        dict(image_id=1, category_id=9, bbox=[5, 5, 10, 10]),     # unknown category
        dict(image_id=4, category_id=1, bbox=[5, 5, 10, 10]),     # its image file is missing
        dict(image_id=5, category_id=5, bbox=[2, 2, 10, 6]),      # image smaller than the stride
        dict(image_id=6, category_id=1, bbox=[2, 2, 10, 6], segmentation=[]),  # no mask: its box is used
    ]  # image 2 and 3: no annotations
    ann = write_coco(tmp_path, images, anns)
    with caplog.at_level(logging.WARNING):
        train = CocoDetection(ann, tmp_path / "train", train=True, hflip=0.0)
    assert "4.png" in caplog.text  # the missing file is named
    assert train.counts == dict(missing_images=1, bad_annotations=1, dropped_boxes=2, box_only_masks=1, empty_images=2, crowd=1)
    assert [r[0]["id"] for r in train.records] == [1, 5, 6]  # empty images left out of training
    assert train.cat_id_to_label == {1: 1, 5: 2} and train.label_to_cat_id == {1: 1, 2: 5}
    image, target, skipped = train[0]
    assert image.shape == (3, 48, 64) and skipped == 0 and target["image_id"] == 1
    assert target["boxes"].tolist() == [[50.0, 30.0, 64.0, 48.0]] and target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, 48, 64)
    box_only = train[2][1]
    assert box_only["masks"].sum() == 10 * 6
    val = CocoDetection(ann, tmp_path / "train")
    assert [r[0]["id"] for r in val.records] == [1, 2, 3, 5, 6]  # kept for evaluation
    # The tiny image and every other sample go through a training step of the detector.
    model = small_rcnn(2).train()
    images_, targets, _ = collate_detection([train[i] for i in range(len(train))])
    losses = model(images_, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_flip_moves_boxes_and_masks_together(tmp_path):
    ann = write_coco(tmp_path, [img(1)], [dict(image_id=1, category_id=1, bbox=[4, 6, 10, 20])])
    plain = CocoDetection(ann, tmp_path / "train", train=True, hflip=0.0)[0]
    flipped = CocoDetection(ann, tmp_path / "train", train=True, hflip=1.0)[0]
    assert flipped[1]["boxes"].tolist() == [[50.0, 6.0, 60.0, 26.0]]
    assert torch.equal(flipped[0], plain[0].flip(-1)) and torch.equal(flipped[1]["masks"], plain[1]["masks"].flip(-1))


def test_unreadable_or_wrongly_sized_images_are_skipped_and_counted(tmp_path):
    images = [img(1), img(2, file_size=(30, 30)), img(3)]
    anns = [dict(image_id=i, category_id=1, bbox=[2, 2, 10, 10]) for i in (1, 2, 3)]
    ann = write_coco(tmp_path, images, anns)
    (tmp_path / "train" / "3.png").write_bytes(b"not a png")
    val = CocoDetection(ann, tmp_path / "train")
    batch = collate_detection([val[i] for i in range(3)])
    assert len(batch[0]) == 1 and batch[2] == 2
    train = CocoDetection(ann, tmp_path / "train", train=True)
    sample = train[1]  # replaced by the next readable image, counted
    assert sample is not None and sample[2] == 1


def test_unusable_coco_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDetection(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(tmp_path / "bad.json", tmp_path)
    (tmp_path / "x.json").write_text(json.dumps(dict(images=[])))
    with pytest.raises(ValueError, match="annotations"):
        CocoDetection(tmp_path / "x.json", tmp_path)
    ann = write_coco(tmp_path / "d", [img(1, draw=False)], [dict(image_id=1, category_id=1, bbox=[1, 1, 5, 5])])
    with pytest.raises(ValueError, match="none of the 1 images of .*instances_train.json is in .*train; check --data-dir"):
        CocoDetection(ann, tmp_path / "d" / "train")
    (tmp_path / "list.json").write_text(json.dumps([dict(id=1)]))
    with pytest.raises(ValueError, match=r"list\.json: the top level is a JSON list; a COCO instances file is an object"):
        CocoDetection(tmp_path / "list.json", tmp_path)
    no_images = write_coco(tmp_path / "e", [], [], split="val")
    with pytest.raises(ValueError, match=r"instances_val\.json lists no images \(its 'images' list is empty\)"):
        CocoDetection(no_images, tmp_path / "e" / "val")


def test_an_annotation_with_a_bad_box_is_dropped_counted_and_named(tmp_path, caplog):
    images = [img(1), img(2)]
    anns = [dict(image_id=1, category_id=1, bbox=[4, 4, 30, 20]), dict(image_id=2, category_id=5, bbox=[2, 2, 20, 20])]
    ann = write_coco(tmp_path, images, anns, split="val")
    data = json.loads(ann.read_text())
    data["annotations"] += [dict(id=77, image_id=1, category_id=1, bbox=["x", 4, 10, 10], iscrowd=0),
                            dict(id=78, image_id=2, category_id=5, bbox=[1, 2, 3], iscrowd=0)]
    ann.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        val = CocoDetection(ann, tmp_path / "val")
    assert val.counts["bad_annotations"] == 2
    assert "2 annotations dropped" in caplog.text and "instances_val.json" in caplog.text
    assert "annotation 77 has bbox ['x', 4, 10, 10], not four finite numbers" in caplog.text and "annotation 78" in caplog.text
    assert [a["id"] for a in val.coco_gt_data["annotations"]] == [1, 2]  # neither scored nor trained on
    assert len(val.coco_gt.getAnnIds()) == 2


def test_the_log_says_what_evaluation_does_with_a_zero_width_box(tmp_path, caplog):
    anns = [dict(image_id=1, category_id=1, bbox=[4, 4, 30, 20]), dict(image_id=1, category_id=5, bbox=[10, 10, 0, 20])]
    ann = write_coco(tmp_path, [img(1)], anns, split="val")
    with caplog.at_level(logging.INFO, logger="mlla"):
        val = CocoDetection(ann, tmp_path / "val")
        train = CocoDetection(ann, tmp_path / "val", train=True)
    assert len(val.coco_gt.getAnnIds()) == 2  # COCOeval scores the zero-width box
    assert "boxes under 1 pixel or outside the image: 1 (scored as annotated" in caplog.text
    assert train.counts["dropped_boxes"] == 1 and "dropped boxes (under 1 pixel or outside the image): 1" in caplog.text
    assert len(train[0][1]["boxes"]) == 1  # not a training target


# ------------------------------------------------------------------ the task in the one trainer
TINY_RUN = dict(
    task="detection", model="test_mlla", epochs=2, batch_size=2, det_min_sizes=(64,), det_max_size=64,
    model_kwargs=dict(SMALL, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32),
    lr=1e-3, warmup_steps=1, sched="step", decay_milestones=(1,), amp=False, model_ema=False, workers=0, progress=False,
)


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    from mlla.dense import make_det_demo_dataset

    return make_det_demo_dataset(tmp_path_factory.mktemp("det") / "data", train_images=8, val_images=4, img_size=64, progress=False)


def tiny_config(data: Path, output: Path, **kw):
    from mlla.tasks import DetectionTask

    return DetectionTask.resolve_settings(overrides=dict(TINY_RUN, data_dir=str(data), output=str(output), **kw))


def test_detection_trains_in_the_one_engine_with_ap_metrics_and_checkpoints(det_data, tmp_path):
    from mlla.engine.trainer import fit

    summary = fit(tiny_config(det_data, tmp_path / "run"))
    assert summary["status"] == "finished" and summary["epoch"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss_mask", "train_loss_objectness", "val_bbox_AP", "val_segm_AP", "val_bbox_APl", "val_skipped"):
        assert key in rows[-1], key
    assert 0 <= rows[-1]["val_bbox_AP"] <= 100
    for name in ("last.pth", "best.pth", "metrics.png", "metrics.csv", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert [c["id"] for c in ckpt["categories"]] == [1, 3, 7]


def test_compile_is_refused_for_detection_with_the_reason(det_data, tmp_path):
    from mlla.engine.preflight import SettingsError
    from mlla.engine.trainer import fit

    with pytest.raises(SettingsError, match="--compile does not apply to the detection task: torchvision's Mask R-CNN"):
        fit(tiny_config(det_data, tmp_path / "run", compile=True))
    assert not (tmp_path / "run").exists()


_KILL_SCRIPT = """
import os, signal, sys
from mlla.engine.trainer import fit
from mlla.tasks import DetectionTask
cfg = DetectionTask.resolve_settings(overrides={config})
fit(cfg, on_step=lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 3 else None)
"""


@pytest.mark.slow  # about 20-45 s: a second Python process trains, is killed, then this one resumes
def test_detection_run_resumes_after_kill_9(det_data, tmp_path):
    from mlla.engine.trainer import fit

    cfg = tiny_config(det_data, tmp_path / "run", save_every_steps=1)
    env = dict(os.environ, PYTHONPATH=str(Path(mlla.__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(config=repr(cfg.to_dict()))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert killed["global_step"] == 2  # saved after step 2; killed during step 3's bookkeeping
    cfg.resume = "auto"
    summary = fit(cfg)
    assert summary["status"] == "finished" and summary["epoch"] == 2
    final = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert final["global_step"] == 8  # 4 steps per epoch: continued, not restarted
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_det_cli_eval_prints_the_ap_table_and_predict_draws_pictures(det_data, tmp_path, capsys):
    from mlla.cli import main
    from mlla.engine.trainer import fit

    fit(tiny_config(det_data, tmp_path / "run", epochs=1))
    assert main(["det", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data-dir", str(det_data), "-j", "0", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"bbox_AP", "segm_AP", "bbox_AP50", "segm_APl", "images"} <= set(metrics) and metrics["images"] == 4
    # without --data-dir: the run's data and validation split, from its saved settings
    assert main(["det", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "-j", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| box |" in out and f"on {det_data} val (4 images)" in out
    # A warning logged while the progress bar runs (an unreadable image) is a line of its own.
    broken = tmp_path / "broken"
    shutil.copytree(det_data, broken)
    (broken / "val" / "00002.png").write_bytes(b"\x89PNG cut short")
    env = dict(os.environ, PYTHONPATH=str(Path(mlla.__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mlla.cli", "det", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"),
                           "--data-dir", str(broken), "-j", "0", "-b", "1", "--json", "--max-failed-fraction", "0.5"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "evaluate:" in proc.stderr  # the bar was drawn
    warnings = [line for line in proc.stderr.split("\n") if "skipping image" in line]
    assert warnings and all(line.split("\r")[-1].startswith("WARNING mlla") for line in warnings), proc.stderr
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("00000.png", "00001.png"):
        (folder / name).write_bytes((det_data / "val" / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    assert main(["det", "predict", str(folder), "--checkpoint", str(tmp_path / "run" / "last.pth"), "--score-threshold", "0"]) == 0
    out = Image.open(folder / "00000.png.det.png")
    assert out.size == (512, 512)  # enlarged 8 times: a 64-pixel picture would be unreadable
    assert main(["det", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data-dir", str(tmp_path)]) == 2
    assert "expected" in capsys.readouterr().err


def test_detection_pictures_are_enlarged_and_labels_readable_inside_the_picture():
    from mlla.tasks.detection.visualize import draw_detections

    image = torch.full((3, 48, 64), 40, dtype=torch.uint8)
    det = dict(boxes=torch.tensor([[50.0, 2, 64, 20], [5, 30, 20, 46]]), labels=torch.tensor([3, 1]),
               scores=torch.tensor([0.9, 0.6]), masks=torch.zeros(2, 1, 48, 64))
    det["masks"][0, 0, 2:20, 50:64] = 1
    picture = draw_detections(image, det, {1: "circle", 2: "square", 3: "triangle"})
    assert picture.size == (640, 480)  # 48 px high: enlarged 10 times (to at least 480)
    pixels = np.asarray(picture)
    # The label of the box at the top-right corner: a box of its class colour (yellow), inside the
    # picture although the detection touches two edges, holding dark text.
    yellow = np.all(pixels == (255, 225, 25), axis=-1)
    ys, xs = yellow.nonzero()
    assert len(ys) > 500 and xs.max() < 640 and ys.min() >= 0
    label = pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert (label.sum(-1) < 60).sum() > 50  # black text on yellow, not yellow on yellow
    red_label = np.all(pixels == (230, 25, 75), axis=-1)
    assert (pixels[red_label.nonzero()[0].min():red_label.nonzero()[0].max() + 1,
                   red_label.nonzero()[1].min():red_label.nonzero()[1].max() + 1].min(-1) > 200).sum() > 50  # white on red


def test_detector_flops_are_counted_as_the_paper_counts_them():
    from mlla.tasks.detection.stats import mask_rcnn_gmacs

    with torch.device("meta"):
        parts = mask_rcnn_gmacs(mask_rcnn("test_mlla", 80).eval())
    # Box head on 1000 RoIs: fc 256*7*7 -> 1024 -> 1024, class scores (81) and boxes (81 * 4).
    assert parts["box_head"] == pytest.approx(1000 * 1024 * (256 * 49 + 1024 + 81 + 324) / 1e9)
    # Mask head on 100 RoIs: four 3x3 convs at 14x14, a 2x2 stride-2 deconvolution, 1x1 logits at 28x28.
    mask = 100 * (4 * 14 * 14 * 256 * 256 * 9 + 28 * 28 * 256 * 256 + 28 * 28 * 256 * 81)
    assert parts["mask_head"] == pytest.approx(mask / 1e9)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_mlla_models_lists_mask_rcnn_beside_the_papers_figures(capsys):
    from mlla.cli import main

    assert main(["models", "mask_rcnn_mlla_tiny", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "mask_rcnn_mlla_tiny" and row["paper_params_m"] == 44.0 and row["paper_gmacs"] == 255.0
    assert row["params_m"] == pytest.approx(44.0, rel=0.01) and row["gmacs"] == pytest.approx(255.0, rel=0.01)
