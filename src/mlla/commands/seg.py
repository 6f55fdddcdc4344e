"""``mlla seg``: semantic segmentation with UperNet on an MLLA backbone (``mlla.dense``).

``mlla seg train`` runs the one training engine with the segmentation task (every ``mlla train``
flag applies, plus the ``--seg-*`` ones); ``mlla seg eval`` prints mIoU / mAcc / aAcc of a
checkpoint (single- or multi-scale, whole-image or sliding-window); ``mlla seg predict`` writes a
colour-coded overlay with a legend next to each input image.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from . import train as train_command

_logger = logging.getLogger(__name__)
_S = argparse.SUPPRESS
#: ``--preset`` names of ``mlla seg train`` that stand for a segmentation preset.
_PRESET_ALIASES = {"demo": "seg-demo"}


def _ints(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 2048,512, got {text!r}") from None
    return a, b


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "seg",
        help="semantic segmentation: UperNet on MLLA (train, eval, predict) on ADE20K-layout data",
        description="UperNet on an MLLA backbone over ADE20K-layout data: DIR/images/{training,validation}/*.jpg "
        "with label maps DIR/annotations/{training,validation}/*.png (label 0 = unlabelled).",
    )
    sub = p.add_subparsers(dest="seg_command", metavar="SUBCOMMAND", required=True)

    train_command.register(sub)  # the `mlla train` parser, with its flags, as `mlla seg train`
    t = sub.choices["train"]
    t.description = (
        "Train UperNet with the one training engine. Presets: ade20k-160k (the paper's recipe; default with "
        "--data-dir) and demo (generated scenes; default without --data-dir). Every `mlla train` flag applies."
    )
    g = t.add_argument_group("segmentation")
    g.add_argument("--seg-crop-size", type=int, help="training crop and sliding window (512)")
    g.add_argument("--seg-scale", type=_ints, help="long,short edge bounds of the keep-ratio resize (2048,512)")
    g.add_argument("--seg-ratio-range", type=train_command._pair, help="training resize ratios (0.5,2.0)")
    g.add_argument("--seg-cat-max-ratio", type=float, help="redraw crops where one class covers more (0.75; 1: off)")
    g.add_argument("--seg-reduce-zero-label", action=argparse.BooleanOptionalAction, help="label 0 is unlabelled (ADE20K)")
    g.add_argument("--seg-channels", type=int, help="UperNet width (512)")
    g.add_argument("--seg-aux-channels", type=int, help="auxiliary head width (256)")
    g.add_argument("--seg-aux-weight", type=float, help="auxiliary loss weight (0.4; 0: no auxiliary head)")
    g.add_argument("--seg-test-mode", choices=["whole", "slide"], help="validation inference")
    g.add_argument("--seg-stride", type=int, help="sliding-window stride (341)")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="mIoU, mAcc and aAcc of a checkpoint",
                       description="Score a `mlla seg train` checkpoint on a split of ADE20K-layout data.")
    e.add_argument("--checkpoint", required=True, help="last.pth or best.pth of a `mlla seg train` run")
    e.add_argument("--data-dir", help="dataset folder (default: the run's)")
    e.add_argument("--split", help="split folder under images/ and annotations/ (default: the run's validation split)")
    _inference_args(e)
    e.add_argument("-j", "--workers", type=int, default=2)
    e.add_argument("--per-class", action="store_true", help="also print each class's IoU and accuracy")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write a colour-coded overlay with a legend next to each image",
                       description="Segment images (files or folders) and write INPUT<suffix>.png beside each.")
    r.add_argument("inputs", nargs="+", help="image files or folders of images")
    r.add_argument("--checkpoint", required=True, help="last.pth or best.pth of a `mlla seg train` run")
    _inference_args(r)
    r.add_argument("--suffix", default="_seg", help="added to each input's name for the picture (default _seg)")
    r.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (default 0.5)")
    r.set_defaults(func=run_predict)


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multi-scale", action="store_true", help="average ratios 0.5-1.75 of the test scale (with flips)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also average horizontally flipped images (default: with --multi-scale)")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding windows (default: the run's)")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of the checkpoint")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")


def run_train(args: argparse.Namespace) -> int:
    from ..engine.config import TrainConfig, parse_kwargs, resolve_config
    from ..engine.presets import get_preset
    from ..engine.trainer import fit

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "model_kwargs" in given:
        given["model_kwargs"] = parse_kwargs(given["model_kwargs"])
    given["task"] = "segmentation"
    preset = getattr(args, "preset", None)
    if preset is None and "config" not in vars(args):
        preset = "seg-demo" if "data_dir" not in given else "ade20k-160k"
    preset = _PRESET_ALIASES.get(preset, preset)
    if preset and get_preset(preset).get("task") != "segmentation":
        raise ValueError(f"--preset {preset} is not a segmentation recipe; choose ade20k-160k or demo")
    cfg = resolve_config(preset, getattr(args, "config", None), given)
    if cfg.output is None:
        cfg.output = str(Path("runs") / f"upernet_{cfg.model}")
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    summary = fit(cfg)
    last = summary["last"]
    if summary["status"] == "finished" and "val_mIoU" in last:
        print(f"validation mIoU after {summary['epoch']} epochs: {last['val_mIoU']:.2f}% (mAcc {last['val_mAcc']:.2f}%, "
              f"aAcc {last['val_aAcc']:.2f}%; best mIoU {summary['best']['score']:.2f}%); checkpoints, metrics and "
              f"plot in {summary['output']}")
    return 0


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model on its device, task, device, predict_probs options) from the inference flags."""
    import torch

    from ..tasks.segmentation.evaluate import MS_RATIOS
    from ..tasks.segmentation.task import segmenter_from_checkpoint
    from ..engine.distributed import pick_device

    model, task = segmenter_from_checkpoint(args.checkpoint, use_ema=args.use_ema)
    device = pick_device(args.device)
    model.to(device)
    options = dict(task.inference_options(), ratios=MS_RATIOS if args.multi_scale else (1.0,),
                   flip=args.multi_scale if args.flip is None else args.flip)
    if args.mode:
        options["mode"] = args.mode
    if args.amp:
        options["autocast"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return model, task, device, options


def run_eval(args: argparse.Namespace) -> int:
    from ..data import build_loader
    from ..tasks.segmentation.ade import SegmentationDataset, build_seg_transform, collate_segmentation
    from ..tasks.segmentation.evaluate import segmentation_confusion, segmentation_metrics
    from ..engine.distributed import DistEnv

    model, task, device, options = _setup(args)
    cfg = task.cfg
    data_dir = Path(args.data_dir or cfg.data_dir or Path(cfg.output) / "demo_data")
    split = args.split or cfg.val_split
    dataset = SegmentationDataset(data_dir, split, build_seg_transform(False), num_classes=task.num_classes,
                                  reduce_zero_label=cfg.seg_reduce_zero_label)
    loader = build_loader(dataset, 1, is_training=False, workers=args.workers, seed=0, collate_fn=collate_segmentation)
    confusion, images, skipped = segmentation_confusion(model, loader, task.num_classes, DistEnv(device=device), **options)
    if images == 0:
        raise RuntimeError(f"no usable images in {data_dir}/images/{split} ({skipped} skipped)")
    scores = segmentation_metrics(confusion)
    how = ("multi-scale " + ("+ flip " if options["flip"] else "")) if len(options["ratios"]) > 1 else ("single-scale " + ("+ flip " if options["flip"] else ""))
    result = dict(checkpoint=str(args.checkpoint), data=str(data_dir), split=split, inference=how.strip(), mode=options["mode"],
                  images=images, skipped=skipped, classes=task.classes, **scores)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{data_dir} {split} ({images} images{f', {skipped} skipped' if skipped else ''}), {how}{options['mode']}: "
          f"mIoU {scores['mIoU']:.2f}%  mAcc {scores['mAcc']:.2f}%  aAcc {scores['aAcc']:.2f}%")
    if args.per_class:
        print(f"{'class':<24}{'IoU (%)':>9}{'Acc (%)':>9}")
        for name, iou, acc in zip(task.classes, scores["IoU"], scores["Acc"]):
            print(f"{name:<24}{iou:>9.2f}{acc:>9.2f}")
    return 0


def _image_files(inputs: list[str], suffix: str) -> list[Path]:
    from ..data import IMG_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMG_EXTENSIONS and not f.stem.endswith(suffix))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {', '.join(inputs)}")
    return files


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import tv_tensors

    from ..tasks.segmentation.ade import build_seg_transform
    from ..tasks.segmentation.evaluate import predict_probs
    from ..tasks.segmentation.visualize import save_overlay

    files = _image_files(args.inputs, args.suffix)
    model, task, device, options = _setup(args)
    normalize = build_seg_transform(False)
    failed = 0
    for path in files:
        try:
            with Image.open(path) as img:
                rgb = np.array(img.convert("RGB"))
        except (OSError, ValueError) as e:
            failed += 1
            _logger.warning("skipping unreadable image %s (%s)", path, e)
            continue
        image = normalize(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))).as_subclass(torch.Tensor)
        with torch.no_grad():
            labels = predict_probs(model, image.to(device), num_classes=task.num_classes, **options).argmax(0)
        out = save_overlay(rgb, labels, task.classes, path.with_name(f"{path.stem}{args.suffix}.png"), alpha=args.alpha)
        print(out)
    if failed:
        print(f"{failed} of {len(files)} images could not be read (see the warnings)")
    return 0 if failed < len(files) else 2
