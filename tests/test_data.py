"""Datasets, bad data handling, deterministic augmentation and the resumable sampler."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

import mlla
from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.data import (
    ImageFolderDataset,
    ResumableSampler,
    build_loader,
    build_transform,
    collate_skipping,
    find_split,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), 4, 2, classes=DEMO_CLASSES[:3], progress=False)


@pytest.fixture(scope="module")
def model():
    return mlla.create_model("test_mlla", num_classes=3)


def test_demo_dataset_layout_and_determinism(tmp_path):
    a = make_demo_dataset(tmp_path / "a", 3, 1, classes=("circle", "ring"), progress=False)
    b = make_demo_dataset(tmp_path / "b", 3, 1, classes=("circle", "ring"), progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (3 + 1)
    assert {f.parts[:2] for f in files} == {("train", "circle"), ("train", "ring"), ("val", "circle"), ("val", "ring")}
    for f in files:
        assert np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))
    assert Image.open(a / files[0]).size == (32, 32)
    with pytest.raises(ValueError, match="unknown demo classes"):
        make_demo_dataset(tmp_path / "c", 1, 1, classes=("hexagon",))


def test_image_folder_classes_and_samples(tiny_folder):
    ds = ImageFolderDataset(tiny_folder / "train")
    assert ds.classes == sorted(DEMO_CLASSES[:3])
    assert len(ds) == 12
    img, target, skipped = ds[5]
    assert isinstance(img, Image.Image) and skipped == 0
    assert ds.classes[target] == ds.samples[5][0].split("/")[-2]


def test_corrupt_images_are_replaced_in_training_and_dropped_in_evaluation(tmp_path, model, caplog):
    root = make_demo_dataset(tmp_path / "d", 3, 1, classes=DEMO_CLASSES[:2], progress=False)
    bad = sorted((root / "train").rglob("*.png"))[:2]
    bad[0].write_bytes(b"not an image at all")
    good = bad[1].read_bytes()
    bad[1].write_bytes(good[: len(good) // 2])  # truncated PNG
    tf = build_transform(model, is_training=False, img_size=32, crop_pct=1.0)
    train = ImageFolderDataset(root / "train", tf, replace_bad=True)
    images, targets, skipped = collate_skipping([train[i] for i in range(len(train))])
    assert images.shape == (6, 3, 32, 32) and skipped == 2  # both replaced, both counted
    assert sorted(f.path for f in skipped.failures) == sorted(map(str, bad))
    assert all(f.stage == "load" for f in skipped.failures)
    loader = build_loader(train, 6, is_training=False, workers=0, seed=0, max_failed_fraction=None)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two passes: each file is logged once
            assert sum(int(b[2]) for b in loader) == 2
    logged = [r.message for r in caplog.records if "skipping training sample" in r.message or "skipping validation" in r.message]
    assert len(logged) == 2 and all(any(str(p) in m for p in bad) for m in logged)
    evaluation = ImageFolderDataset(root / "train", tf)
    images, targets, skipped = collate_skipping([evaluation[i] for i in range(len(evaluation))])
    assert images.shape[0] == 4 and skipped == 2


def test_all_images_unreadable_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, replace_bad=True)
    with pytest.raises(RuntimeError, match=r"3 samples in a row .* failed \(unreadable files.*load: UnidentifiedImageError"):
        ds[0]


def test_non_image_files_are_ignored_with_a_warning(tmp_path, caplog):
    make_demo_dataset(tmp_path, 2, 1, classes=("circle", "ring"), progress=False)
    (tmp_path / "train" / "circle" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path / "train")
    assert len(ds) == 4
    assert any("not images" in r.message and "notes.txt" in r.message for r in caplog.records)


def test_missing_and_empty_splits_are_clear_errors(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no 'val' split.*found folders: train"):
        find_split(tmp_path, "val")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        find_split(tmp_path / "nope", "train")


def test_val_classes_must_match_training_classes(tiny_folder):
    train = ImageFolderDataset(tiny_folder / "train")
    with pytest.raises(ValueError, match="differ from the training classes"):
        ImageFolderDataset(tiny_folder / "val", class_to_idx={**train.class_to_idx, "extra": 3})


def test_augmentation_depends_only_on_seed_epoch_and_index(tiny_folder, model):
    tf = build_transform(model, is_training=True, img_size=32, aa="rand-m9-mstd0.5-inc1", reprob=0.5)
    ds = ImageFolderDataset(tiny_folder / "train", tf, seed=3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = ds[2][0]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state = torch.get_rng_state()
    b = ds[2][0]
    assert torch.equal(a, b)  # global random state does not matter ...
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], a)  # another epoch, another augmentation


def test_sampler_union_over_processes_equals_one_process_batch(tiny_folder):
    ds = ImageFolderDataset(tiny_folder / "train")
    one = list(ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True))
    two = [list(ResumableSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True)) for r in range(2)]
    global_batch = 4
    for step in range(len(ds) // global_batch):
        per_rank = [set(t[step * 2:(step + 1) * 2]) for t in two]
        assert per_rank[0] | per_rank[1] == set(one[step * global_batch:(step + 1) * global_batch])
    s = ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    s.set_epoch(0, start=5)
    assert list(s) == one[5:] and len(s) == len(one) - 5


def test_evaluation_sampler_covers_each_image_once(tiny_folder):
    ds = ImageFolderDataset(tiny_folder / "val")  # 6 images
    seen = [i for r in range(4) for i in ResumableSampler(ds, num_replicas=4, rank=r, shuffle=False, seed=0, drop_last=False)]
    assert sorted(seen) == list(range(len(ds)))


def test_loader_yields_images_targets_and_skip_count(tiny_folder, model):
    tf = build_transform(model, is_training=True, img_size=32, aa="rand-m9-mstd0.5-inc1")
    loader = build_loader(ImageFolderDataset(tiny_folder / "train", tf), 4, is_training=True, workers=0, seed=0)
    batches = list(loader)
    assert len(batches) == 3
    images, targets, skipped = batches[0]
    assert images.shape == (4, 3, 32, 32) and targets.dtype == torch.long and skipped == 0
