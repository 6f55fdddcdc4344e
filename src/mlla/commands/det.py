"""``mlla det train|eval|predict``: Mask R-CNN on an MLLA backbone, on COCO-format data.

Data layout (COCO's): ``DIR/annotations/instances_<split>.json`` and ``DIR/<split>/<images>``,
with ``--train-split``/``--val-split`` naming the splits (``train2017``/``val2017`` in the
``coco-*`` presets, ``train``/``val`` otherwise). Training runs the one engine
(:mod:`mlla.engine.trainer`) with the detection task; under ``torchrun`` it uses every process.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .train import _BOOL, _S, _floats, _optional, add_run_arguments

_logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_OUTPUT_SUFFIX = ".det.png"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas like 480,512,800, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tasks.detection.presets import DET_PRESETS

    p = subparsers.add_parser(
        "det", help="detection and instance segmentation (Mask R-CNN): train, eval, predict",
        description="Mask R-CNN with an MLLA backbone on COCO-format data: DIR/annotations/instances_<split>.json "
        "and DIR/<split>/ images.",
    )
    sub = p.add_subparsers(dest="det_command", metavar="{train,eval,predict}", required=True)

    t = sub.add_parser(
        "train", argument_default=_S,
        help="train (presets coco-1x, coco-3x, demo)",
        description="Train Mask R-CNN with the one training engine. Settings: defaults < --preset < --config YAML "
        "< flags. Without --data-dir: the generated demo data and --preset demo; with it, coco-1x unless told. "
        "Several processes: torchrun --nproc_per_node N -m mlla.cli det train ...",
    )
    add_run_arguments(t, sorted(DET_PRESETS), preset_help="recipe preset (coco-1x: 12 epochs, coco-3x: 36, demo)",
                      default_output="runs/det-MODEL")
    g = t.add_argument_group("model")
    g.add_argument("--model", help="backbone: mlla_tiny, mlla_small, mlla_base, test_mlla (or another timm model)")
    g.add_argument("--model-kwargs", nargs="*", metavar="NAME=VALUE",
                   help="more mlla.dense.mask_rcnn options, e.g. fpn_channels=128 box_detections_per_img=50")
    g.add_argument("--num-classes", type=int, help="check the data has this many categories")
    g.add_argument("--drop-path", type=_optional(float), help="backbone stochastic depth (default: the preset's)")
    g.add_argument("--initial-checkpoint", help="backbone weights: a classification checkpoint, the authors' detection "
                   "checkpoint (backbone.* keys) or a detection run's checkpoint")
    g.add_argument("--sync-bn", action=_BOOL, help="BatchNorm statistics over all processes")
    g = t.add_argument_group("data")
    g.add_argument("--data-dir", help="COCO-layout root (default: generate the demo data in OUTPUT/demo_data)")
    g.add_argument("--train-split")
    g.add_argument("--val-split")
    g.add_argument("--det-min-sizes", type=_ints, help="shorter image side, one sampled per batch in training "
                   "(the last in evaluation), e.g. 480,512,...,800")
    g.add_argument("--det-max-size", type=int, help="cap on the longer image side")
    g.add_argument("--det-skip-empty", action=_BOOL, help="leave training images without annotations out (counted)")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")
    g.add_argument("-j", "--workers", type=int)
    g = t.add_argument_group("optimizer and schedule (learning rates at a total batch of --lr-base-size)")
    g.add_argument("--lr", type=_optional(float), help="absolute peak learning rate")
    g.add_argument("--lr-base", type=float)
    g.add_argument("--lr-base-size", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=_optional(int))
    g.add_argument("--sched", choices=["cosine", "step", "poly"])
    g.add_argument("--decay-milestones", type=_floats, help="epochs of the x0.1 steps, e.g. 8,11")
    g.add_argument("--clip-grad", type=_optional(float))
    g.add_argument("--amp", action=_BOOL, help="mixed precision")
    g.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"])
    g.add_argument("--model-ema", action=_BOOL, help="keep and evaluate an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float)
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="COCO box and mask AP of a detection checkpoint",
                       description="Box and mask AP, AP50, AP75, APs/APm/APl (pycocotools) of a checkpoint of "
                       "`mlla det train` on DIR/annotations/instances_<split>.json.")
    e.add_argument("--checkpoint", required=True, help="last.pth or best.pth of a detection run")
    e.add_argument("--data-dir", required=True, help="COCO-layout root")
    e.add_argument("--split", default="val", help="split name (default val; val2017 for COCO)")
    e.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("-b", "--batch-size", type=int, default=2)
    e.add_argument("-j", "--workers", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=run_eval)

    q = sub.add_parser("predict", help="draw detections (boxes, masks, class names) next to images",
                       description=f"For each image (or each image in a folder) write IMAGE{_OUTPUT_SUFFIX} beside it.")
    q.add_argument("inputs", nargs="+", help="image files or folders")
    q.add_argument("--checkpoint", required=True, help="last.pth or best.pth of a detection run")
    q.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    q.add_argument("--use-ema", action="store_true")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=run_predict)


def config_from_args(args: argparse.Namespace):
    """The :class:`~mlla.engine.config.TrainConfig` of parsed ``det train`` arguments."""
    from ..tasks.detection.presets import get_det_preset
    from ..engine.config import TrainConfig, load_yaml, parse_kwargs, resolve_config

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "model_kwargs" in given:
        given["model_kwargs"] = parse_kwargs(given["model_kwargs"])
    preset = getattr(args, "preset", None)
    if preset is None and "config" not in vars(args):
        preset = "coco-1x" if "data_dir" in given else "demo"
    values: dict[str, Any] = get_det_preset(preset) if preset else {"task": "detection"}
    if "config" in vars(args):
        values.update(load_yaml(args.config))
    if "model_kwargs" in given and "model_kwargs" in values:
        given["model_kwargs"] = dict(values["model_kwargs"], **given["model_kwargs"])
    values.update(given)
    if values.get("task", "detection") != "detection":
        raise ValueError(f"`mlla det train` trains detection, but the settings say task={values['task']!r}")
    values["task"] = "detection"
    values.setdefault("output", str(Path("runs") / f"det-{values.get('model', 'model')}"))
    return resolve_config(None, None, values)


def run_train(args: argparse.Namespace) -> int:
    from ..tasks.detection.task import format_ap_table
    from ..engine.trainer import fit

    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    summary = fit(cfg)
    last = summary["last"]
    if summary["status"] == "finished" and "val_bbox_AP" in last:
        print(f"after {summary['epoch']} epochs (validation, COCO AP in %):")
        print(format_ap_table({k[4:]: v for k, v in last.items() if k.startswith("val_")}))
        print(f"checkpoints, metrics and plot in {summary['output']}")
    return 0


def load_detector(path: str, *, use_ema: bool = False):
    """``(model, categories, cfg)`` from a checkpoint of ``mlla det train`` (safe loading)."""
    from ..checkpoint import CheckpointError, read_checkpoint
    from ..tasks.detection.model import mask_rcnn
    from ..engine.config import TrainConfig, resolve_config

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "categories" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of `mlla det train` (no config or categories in it)")
    config = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = resolve_config(None, None, config)
    weights = ckpt.get("model_ema") if use_ema else ckpt.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no {'EMA ' if use_ema else ''}weights" + ("; drop --use-ema" if use_ema else ""))
    model = mask_rcnn(cfg.model, len(ckpt["categories"]), min_size=tuple(cfg.det_min_sizes), max_size=cfg.det_max_size, **cfg.model_kwargs)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the detector its config describes: {str(e).splitlines()[0]}") from e
    return model.eval(), ckpt["categories"], cfg


def run_eval(args: argparse.Namespace) -> int:
    from ..data import build_loader
    from ..tasks.detection.coco import CocoDetection, collate_detection
    from ..tasks.detection.task import coco_split_paths, evaluate_detector, format_ap_table
    from ..engine.distributed import DistEnv, pick_device

    model, categories, _ = load_detector(args.checkpoint, use_ema=args.use_ema)
    ann, images = coco_split_paths(args.data_dir, args.split)
    dataset = CocoDetection(ann, images, categories=categories)
    env = DistEnv(device=pick_device(args.device))
    model.to(env.device)
    loader = build_loader(dataset, args.batch_size, is_training=False, workers=args.workers, seed=0, collate_fn=collate_detection)
    metrics = evaluate_detector(model, loader, env)
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), data=str(ann), **metrics), indent=1))
        return 0
    skipped = f", {metrics['skipped']} unreadable images skipped" if metrics["skipped"] else ""
    print(f"{args.checkpoint} on {ann} ({metrics['images']} images{skipped}), COCO AP in %:")
    print(format_ap_table(metrics))
    return 0


def _find_images(inputs: list[str]) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.endswith(_OUTPUT_SUFFIX))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not found:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return found


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from ..tasks.detection.visualize import draw_detections
    from ..engine.distributed import pick_device

    model, categories, _ = load_detector(args.checkpoint, use_ema=args.use_ema)
    device = pick_device(args.device)
    model.to(device)
    names = {i + 1: c["name"] for i, c in enumerate(categories)}
    written, failed = 0, 0
    for path in _find_images(args.inputs):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as e:
            _logger.warning("skipping %s: not a readable image (%s)", path, e)
            failed += 1
            continue
        pixels = pil_to_tensor(image)
        with torch.no_grad():
            det = model([pixels.float().div(255).to(device)])[0]
        keep = det["scores"] >= args.score_threshold
        det = {k: v[keep].cpu() for k, v in det.items()}
        out = path.with_name(path.name + _OUTPUT_SUFFIX)
        draw_detections(pixels, det, names).save(out)
        written += 1
        print(f"{path}: {int(keep.sum())} detections -> {out}")
    if failed:
        print(f"{failed} unreadable files skipped")
    return 0 if written else 2
