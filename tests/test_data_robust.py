"""Data that must not stop a run: every RandAugment operation at every magnitude on odd images,
every image mode Pillow opens, samples whose transform raises (with and without workers)."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment

import mlla
from mlla.tasks.classification import DEMO_CLASSES, make_demo_dataset
from mlla.data import (
    ImageFolderDataset,
    TooManyFailedSamples,
    build_loader,
    build_transform,
    to_rgb,
)
from mlla.data.auto_augment import posterize

RECIPE = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def model():
    return mlla.create_model("test_mlla", num_classes=3)


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    return {
        "RGB": Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
        "L": Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)),
        "I;16": Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)),
        "RGB 1x1": Image.new("RGB", (1, 1), (200, 10, 30)),
        "RGB 3x5": Image.fromarray(rng.integers(0, 256, (5, 3, 3), dtype=np.uint8)),
        "L 1x1": Image.new("L", (1, 1), 77),
    }


def _rand_augment(model) -> RandAugment:
    tf = build_transform(model, is_training=True, img_size=32, aa=RECIPE)
    found = [t for t in tf.transforms if isinstance(t, RandAugment)]
    assert len(found) == 1
    return found[0]


def test_every_recipe_operation_at_every_magnitude_on_odd_images(model):
    ra = _rand_augment(model)
    names = {op.name for op in ra.ops}
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "Rotate", "ShearX", "TranslateXRel"} <= names
    images = _images()
    # 0..10, and the mstd tail: draws above 10 are clipped to 10, below 0 to 0 (timm's _LEVEL_DENOM)
    magnitudes = [*range(11), 10.7, 13.0, -0.4]
    for op in ra.ops:
        op.prob, op.magnitude_std = 1.0, 0
        for m in magnitudes:
            op.magnitude = m
            for kind, img in images.items():
                random.seed(0)
                out = op(img)
                assert out.mode == "RGB" and out.size == img.size, (op.name, m, kind)


def test_posterize_keeps_the_policys_meaning(model):
    ra = _rand_augment(model)
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    op.magnitude = 10  # keeps 0 bits: black, as Pillow < 13 gave
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 0  # keeps 4 bits
    assert sorted(np.unique(np.asarray(op(img)))) == list(range(0, 256, 16))
    assert posterize(img, 8) is img and np.asarray(posterize(img, -2)).max() == 0


def test_the_recipe_with_its_random_magnitudes_never_raises(model):
    tf = build_transform(model, is_training=True, img_size=32, aa=RECIPE, reprob=0.25)
    images = list(_images().values())
    for i in range(300):  # ~2% of the draws of m9 with std 0.5 reach the clip at 10
        random.seed(i), np.random.seed(i), torch.manual_seed(i)
        x = tf(images[i % len(images)])
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_every_image_mode_keeps_its_content():
    ramp16 = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    out = np.asarray(to_rgb(Image.fromarray(ramp16)))  # I;16
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all()
    grey = out[..., 0].ravel()
    assert grey[0] == 0 and grey[-1] == 255 and (np.diff(grey.astype(int)) >= 0).all() and len(np.unique(grey)) > 200
    as_i = np.asarray(to_rgb(Image.fromarray(ramp16.astype(np.int32))))[..., 0].ravel()  # mode I
    assert np.array_equal(as_i, grey)
    floats = np.asarray(to_rgb(Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))))
    assert floats[0, 0, 0] == 0 and floats[-1, -1, 0] == 255 and len(np.unique(floats)) > 200
    wide = np.asarray(to_rgb(Image.fromarray(np.linspace(-5, 500, 256, dtype=np.float32).reshape(16, 16))))
    assert wide.min() == 0 and wide.max() == 255

    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    p = np.asarray(to_rgb(palette))
    assert tuple(p[1, 1]) == (255, 0, 0) and tuple(p[0, 0]) == (0, 0, 0)

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red stays red
    rgba.putpixel((1, 0), (0, 255, 0, 0))  # fully transparent shows the white background
    assert [tuple(v) for v in np.asarray(to_rgb(rgba))[0]] == [(255, 0, 0), (255, 255, 255)]
    la = np.asarray(to_rgb(Image.merge("LA", [Image.new("L", (2, 2), 40), Image.new("L", (2, 2), 255)])))
    assert (la == 40).all()
    pa = to_rgb(palette.convert("PA"))
    assert tuple(np.asarray(pa)[1, 1]) == (255, 0, 0)
    cmyk = np.asarray(to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))
    assert tuple(cmyk[0, 0]) == (255, 0, 0)
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert [tuple(v) for v in np.asarray(to_rgb(bilevel))[0]] == [(0, 0, 0), (255, 255, 255)]
    assert np.asarray(to_rgb(Image.new("L", (2, 2), 9))).tolist() == [[[9] * 3] * 2] * 2


def test_a_16_bit_png_reaches_the_model_as_a_gradient(tmp_path, model):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))  # left to right
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b" / "x.png")
    assert Image.open(tmp_path / "a" / "ramp.png").mode.startswith("I")
    tf = build_transform(model, is_training=False, img_size=32, crop_pct=1.0)
    ds = ImageFolderDataset(tmp_path, tf)
    x, _, skipped = ds[0]
    row = x[0, 16]  # normalised red channel along the ramp
    assert skipped == 0 and (row.diff() > 0).all()  # a gradient, not clipped to white
    raw = ImageFolderDataset(tmp_path)._load(0)
    assert np.asarray(raw)[0, [0, 31], 0].tolist() == [0, 255]


class _FailOn:
    """A transform that raises on images whose top-left pixel is in ``bad`` (picklable)."""

    def __init__(self, inner, bad: set[tuple[int, int, int]]) -> None:
        self.inner, self.bad = inner, bad

    def __call__(self, img):
        if img.getpixel((0, 0)) in self.bad:
            raise ValueError("bits must be between or equal to 1 and 8")
        return self.inner(img)


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_whose_transform_raises_are_counted_logged_once_and_skipped(tmp_path, model, caplog, workers):
    root = make_demo_dataset(tmp_path / "d", 10, 1, classes=DEMO_CLASSES[:2], progress=False)
    files = sorted((root / "train").rglob("*.png"))
    bad_files = files[3], files[12]
    bad = {Image.open(f).convert("RGB").getpixel((0, 0)) for f in bad_files}
    tf = _FailOn(build_transform(model, is_training=False, img_size=32, crop_pct=1.0), bad)
    ds = ImageFolderDataset(root / "train", tf, replace_bad=True)
    loader = build_loader(ds, 5, is_training=True, workers=workers, seed=0, max_failed_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="mlla"):
        for epoch in range(2):
            ds.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            batches = list(loader)
            assert sum(len(b[1]) for b in batches) == 20  # replaced: batches keep their size
            assert sum(int(b[2]) for b in batches) == 2
    logged = [r.message for r in caplog.records if "skipping training sample" in r.message]
    assert len(logged) == 2  # once per file, not once per epoch or worker
    assert all("transform: ValueError: bits must be" in m for m in logged)
    assert {m.split()[3] for m in logged} == {str(f) for f in bad_files}
    assert loader.failures.total == 4

    strict = build_loader(ds, 5, is_training=True, workers=workers, seed=0, max_failed_fraction=0.05)
    with pytest.raises(TooManyFailedSamples, match=r"2 of the 20 training samples .*10\.0%.*0\.05.*commonest failure "
                       r"\(2 times\) is transform: ValueError: bits must be"):
        list(strict)
