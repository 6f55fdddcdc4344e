"""``mlla det train|eval|predict``: Mask R-CNN on an MLLA backbone, on COCO-format data.

Data layout (COCO's): ``DIR/annotations/instances_<split>.json`` and ``DIR/<split>/<images>``,
with ``--train-split``/``--val-split`` naming the splits (``train2017``/``val2017`` in the
``coco-*`` presets, ``train``/``val`` otherwise). Training runs the one engine
(:mod:`mlla.engine.trainer`) with the detection task; under ``torchrun`` it uses every process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
from typing import Any

from ._task import (
    add_eval_arguments, add_predict_arguments, add_train_command, check_failed, checked_attention_backend, eval_loader, find_images,
)

_logger = logging.getLogger(__name__)

_OUTPUT_SUFFIX = ".det.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tasks.detection.task import DetectionTask

    p = subparsers.add_parser(
        "det", help="detection and instance segmentation (Mask R-CNN): train, eval, predict",
        description="Mask R-CNN with an MLLA backbone on COCO-format data: DIR/annotations/instances_<split>.json "
        "and DIR/<split>/ images.",
    )
    sub = p.add_subparsers(dest="det_command", metavar="{train,eval,predict}", required=True)

    add_train_command(
        sub, "train", DetectionTask, report=_report, preset_help="recipe preset (coco-1x: 12 epochs, coco-3x: 36, demo)",
        help="train (presets coco-1x, coco-3x, demo)",
        description="Train Mask R-CNN with the one training engine. Settings: defaults < --preset < --config YAML "
        "< flags. Without --data-dir: the generated demo data and --preset demo; with it, coco-1x unless told. "
        "Several processes: torchrun --nproc_per_node N -m mlla.cli det train ...",
    )

    e = sub.add_parser("eval", help="COCO box and mask AP of a detection checkpoint",
                       description="Box and mask AP, AP50, AP75, APs/APm/APl (pycocotools) of a checkpoint of "
                       "`mlla det train` on DIR/annotations/instances_<split>.json.")
    add_eval_arguments(e, "mlla det train")
    e.set_defaults(func=run_eval)

    q = sub.add_parser("predict", help="draw detections (boxes, masks, class names) next to images",
                       description=f"For each image (or each image in a folder) write IMAGE{_OUTPUT_SUFFIX} beside it.")
    add_predict_arguments(q, "mlla det train")
    q.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    q.set_defaults(func=run_predict)


def _report(summary: dict[str, Any]) -> None:
    from ..tasks.detection.task import format_ap_table

    last = summary["last"]
    if "val_bbox_AP" in last:
        print(f"after {summary['epoch']} epochs (validation, COCO AP in %):")
        print(format_ap_table({k[4:]: v for k, v in last.items() if k.startswith("val_")}))
        print(f"checkpoints, metrics and plot in {summary['output']}")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..engine.distributed import DistEnv, pick_device
    from ..tasks.detection.task import DetectionTask, evaluate_detector, format_ap_table

    model, task = DetectionTask.from_checkpoint(args.checkpoint, use_ema=args.use_ema)
    loader, data_dir, split = eval_loader(task, args)
    env = DistEnv(device=pick_device(args.device))
    model.to(env.device)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
    with checked_attention_backend(args, model, env.device)():
        metrics = evaluate_detector(model, loader, env, autocast=autocast, progress=args.progress)
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), data=str(data_dir), split=split, **metrics), indent=1))
        return 0
    skipped = f", {metrics['skipped']} unreadable images skipped" if metrics["skipped"] else ""
    print(f"{args.checkpoint} on {data_dir} {split} ({metrics['images']} images{skipped}), COCO AP in %:")
    print(format_ap_table(metrics))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from ..engine.distributed import pick_device
    from ..tasks.detection.task import DetectionTask
    from ..tasks.detection.visualize import draw_detections

    model, task = DetectionTask.from_checkpoint(args.checkpoint, use_ema=args.use_ema)
    device = pick_device(args.device)
    model.to(device)
    names = {i + 1: c["name"] for i, c in enumerate(task.categories)}
    files = find_images(args.inputs, is_output=lambda f: f.name.endswith(_OUTPUT_SUFFIX))
    backend = checked_attention_backend(args, model, device)
    written, failed = 0, 0
    for path in files:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as e:
            _logger.warning("skipping %s: not a readable image (%s)", path, e)
            failed += 1
            continue
        pixels = pil_to_tensor(image)
        with torch.no_grad(), backend():
            det = model([pixels.float().div(255).to(device)])[0]
        keep = det["scores"] >= args.score_threshold
        det = {k: v[keep].cpu() for k, v in det.items()}
        out = path.with_name(path.name + _OUTPUT_SUFFIX)
        draw_detections(pixels, det, names).save(out)
        written += 1
        print(f"{path}: {int(keep.sum())} detections -> {out}")
    if failed:
        print(f"{failed} unreadable files skipped")
    check_failed(failed, len(files), args.max_failed_fraction)
    return 0
