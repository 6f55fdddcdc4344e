"""``mlla seg``: semantic segmentation with UperNet on an MLLA backbone (``mlla.dense``).

``mlla seg train`` runs the one training engine with the segmentation task (its flags are the
fields of :class:`~mlla.tasks.segmentation.settings.SegmentationConfig`); ``mlla seg eval``
prints mIoU / mAcc / aAcc of a checkpoint (single- or multi-scale, whole-image or
sliding-window); ``mlla seg predict`` writes a colour-coded overlay with a legend next to each
input image.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from ._task import (
    add_eval_arguments, add_predict_arguments, add_train_command, check_failed, checked_attention_backend, eval_loader, find_images,
)

_logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tasks.segmentation.task import SegmentationTask

    p = subparsers.add_parser(
        "seg",
        help="semantic segmentation: UperNet on MLLA (train, eval, predict) on ADE20K-layout data",
        description="UperNet on an MLLA backbone over ADE20K-layout data: DIR/images/{training,validation}/*.jpg "
        "with label maps DIR/annotations/{training,validation}/*.png (label 0 = unlabelled).",
    )
    sub = p.add_subparsers(dest="seg_command", metavar="SUBCOMMAND", required=True)

    add_train_command(
        sub, "train", SegmentationTask, report=_report,
        preset_help="recipe preset: ade20k-160k (the paper's recipe; default with --data-dir) or demo (generated "
        "scenes; default without --data-dir)",
        help="train UperNet (presets ade20k-160k, demo)",
        description="Train UperNet with the one training engine. Settings: defaults < --preset < --config YAML < "
        "flags. Several processes: torchrun --nproc_per_node N -m mlla.cli seg train ...",
    )

    e = sub.add_parser("eval", help="mIoU, mAcc and aAcc of a checkpoint",
                       description="Score a `mlla seg train` checkpoint on a split of ADE20K-layout data.")
    add_eval_arguments(e, "mlla seg train")
    _inference_args(e)
    e.add_argument("--per-class", action="store_true", help="also print each class's IoU and accuracy")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write a colour-coded overlay with a legend next to each image",
                       description="Segment images (files or folders) and write INPUT<suffix>.png beside each.")
    add_predict_arguments(r, "mlla seg train")
    r.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    _inference_args(r)
    r.add_argument("--suffix", default="_seg", help="added to each input's name for the picture (default _seg)")
    r.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (default 0.5)")
    r.set_defaults(func=run_predict)


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multi-scale", action="store_true", help="average ratios 0.5-1.75 of the test scale (with flips)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also average horizontally flipped images (default: with --multi-scale)")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding windows (default: the run's)")


def _report(summary: dict[str, Any]) -> None:
    last = summary["last"]
    if "val_mIoU" in last:
        print(f"validation mIoU after {summary['epoch']} epochs: {last['val_mIoU']:.2f}% (mAcc {last['val_mAcc']:.2f}%, "
              f"aAcc {last['val_aAcc']:.2f}%; best mIoU {summary['best']['score']:.2f}%); checkpoints, metrics and "
              f"plot in {summary['output']}")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    """(model on its device, task, device, predict_probs options, attention backend context) from the inference flags."""
    import torch

    from ..engine.distributed import pick_device
    from ..tasks.segmentation.evaluate import MS_RATIOS
    from ..tasks.segmentation.task import SegmentationTask

    model, task = SegmentationTask.from_checkpoint(args.checkpoint, use_ema=args.use_ema)
    device = pick_device(args.device)
    model.to(device)
    options = dict(task.inference_options(), ratios=MS_RATIOS if args.multi_scale else (1.0,),
                   flip=args.multi_scale if args.flip is None else args.flip)
    if args.mode:
        options["mode"] = args.mode
    if args.amp:
        options["autocast"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return model, task, device, options, checked_attention_backend(args, model, device)


def run_eval(args: argparse.Namespace) -> int:
    from ..engine.distributed import DistEnv
    from ..tasks.segmentation.evaluate import segmentation_confusion, segmentation_metrics

    model, task, device, options, backend = _setup(args)
    loader, data_dir, split = eval_loader(task, args)
    with backend():
        confusion, images, skipped = segmentation_confusion(model, loader, task.num_classes, DistEnv(device=device),
                                                            progress=args.progress, **options)
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


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import tv_tensors

    from ..tasks.segmentation.ade import build_seg_transform
    from ..tasks.segmentation.evaluate import predict_probs
    from ..tasks.segmentation.visualize import save_overlay

    files = find_images(args.inputs, is_output=lambda f: f.stem.endswith(args.suffix))
    model, task, device, options, backend = _setup(args)
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
        with torch.no_grad(), backend():
            labels = predict_probs(model, image.to(device), num_classes=task.num_classes, **options).argmax(0)
        out = save_overlay(rgb, labels, task.classes, path.with_name(f"{path.stem}{args.suffix}.png"), alpha=args.alpha)
        print(out)
    if failed:
        print(f"{failed} of {len(files)} images could not be read (see the warnings)")
    check_failed(failed, len(files), args.max_failed_fraction)
    return 0
