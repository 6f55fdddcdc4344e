"""``mlla validate``: top-1/top-5 of a checkpoint (ours or the authors' layout) on an ImageFolder."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._task import MAX_FAILED_HELP, add_attention_backend_argument, checked_attention_backend

_logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="evaluate a checkpoint (ours or the authors') on an ImageFolder",
        description="Top-1/top-5 accuracy and loss of a checkpoint on DIR/SPLIT/<class>/* (or DIR/<class>/*).",
    )
    p.add_argument("--model", help="registered model name (see `mlla models`; default: from --config)")
    p.add_argument("--data-dir", required=True, help="ImageFolder root")
    p.add_argument("--checkpoint", required=True, help=".pth or .safetensors: ours, the authors', or a bare state dict")
    p.add_argument("--split", default="val", help="split folder under --data-dir (default val)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's, 224)")
    p.add_argument("--crop-pct", type=float, help="centre crop fraction (default: the model's, 0.875)")
    p.add_argument("--interpolation", help="resize interpolation (default: the model's, bicubic)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="NAME=VALUE",
                   help="extra model arguments for sizes that are not registered, e.g. embed_dim=32 depths=1,2,2,1 num_heads=1,2,4,8")
    p.add_argument("--config", help="a run's config.yaml: model, model_kwargs, img_size, crop_pct, interpolation from it")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--max-failed-fraction", type=float, default=0.01, help=MAX_FAILED_HELP)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    add_attention_backend_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from ..data import ImageFolderDataset, build_loader, build_transform
    from ..engine.checkpointing import load_model_weights
    from ..engine.config import parse_kwargs
    from ..engine.distributed import DistEnv, pick_device
    from ..models import create_model
    from ..tasks.classification.evaluate import evaluate
    from ..tasks.classification.task import ClassificationTask

    settings = vars(ClassificationTask.resolve_settings(yaml_path=args.config)) if args.config else {}
    model_name = args.model or settings.get("model")
    if not model_name:
        raise ValueError("no model given: pass --model NAME, or --config with a run's config.yaml")
    model_kwargs = dict(settings.get("model_kwargs") or {}, **parse_kwargs(args.model_kwargs))
    root = Path(args.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    split_root = root / args.split if (root / args.split).is_dir() else root
    with torch.device("meta"):
        probe = create_model(model_name, num_classes=0, **model_kwargs)
    cfg = probe.pretrained_cfg
    transform = build_transform(
        probe,
        is_training=False,
        img_size=args.img_size or settings.get("img_size") or cfg["input_size"][-1],
        crop_pct=args.crop_pct or settings.get("crop_pct") or cfg["crop_pct"],
        interpolation=args.interpolation or settings.get("interpolation") or cfg["interpolation"],
    )
    dataset = ImageFolderDataset(split_root, transform)
    model = create_model(model_name, num_classes=len(dataset.classes), **model_kwargs)
    try:
        extras = load_model_weights(model, args.checkpoint, use_ema=args.use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{e} [the model has {len(dataset.classes)} classes: one per class folder in {split_root}]") from e
    saved_classes = extras.get("class_to_idx")
    if saved_classes is not None and saved_classes != dataset.class_to_idx:
        _logger.warning("%s: class folders differ from the checkpoint's training classes; accuracy may be meaningless", split_root)
    env = DistEnv(device=pick_device(args.device))
    model.to(env.device)
    loader = build_loader(dataset, args.batch_size, is_training=False, workers=args.workers, seed=0,
                          max_failed_fraction=args.max_failed_fraction)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if args.amp else None
    with checked_attention_backend(args, model, env.device)():
        result = evaluate(model, loader, env, progress=args.progress, **({"autocast": autocast} if autocast else {}))
    result = dict(model=model_name, checkpoint=str(args.checkpoint), data=str(split_root), ema=args.use_ema, **result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        skipped = f", {result['skipped']} failed images skipped" if result["skipped"] else ""
        print(f"{model_name} on {split_root} ({result['images']} images{skipped}): top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    return 0
