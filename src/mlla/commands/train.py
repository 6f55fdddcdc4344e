"""``mlla train``: train a model with the paper's recipe (or a preset, a YAML file and flags)
on an ImageFolder, or on the generated demo dataset when no data is given.

Run it under ``torchrun --nproc_per_node N -m mlla.cli train ...`` for several processes.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from ..engine.config import TrainConfig, parse_kwargs, resolve_config
from ..engine.presets import PRESETS

_S = argparse.SUPPRESS
_BOOL = argparse.BooleanOptionalAction


def _pair(text: str) -> tuple[float, float]:
    a, sep, b = text.partition(",")
    try:
        return float(a), float(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas like 8,11, got {text!r}") from None


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "off", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_run_arguments(p: argparse.ArgumentParser, presets: list[str], *, preset_help: str, default_output: str) -> None:
    """The "run" flags every training command shares (``mlla train``, ``mlla det train``)."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=presets, help=preset_help)
    g.add_argument("--config", help="YAML file of settings (keys as the flags, with _ for -)")
    g.add_argument("--output", help=f"run folder: config.yaml, last.pth, best.pth, metrics.* (default {default_output})")
    g.add_argument("--resume", help="'auto' (OUTPUT/last.pth if there) or a checkpoint path")
    g.add_argument("--epochs", type=int)
    g.add_argument("-b", "--batch-size", type=int, help="images per process and step")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda")
    g.add_argument("--save-every-steps", type=int, help="also save last.pth every N steps")
    g.add_argument("--progress", action=_BOOL, help="progress bars")
    g.add_argument("--tensorboard", action=_BOOL, help="also log to OUTPUT/tensorboard (needs tensorboard)")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train with the paper's recipe (presets mlla_tiny/small/base, finetune, demo)",
        description="Train on an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*). Settings: defaults < "
        "--preset < --config YAML < flags. Without --data-dir the generated demo dataset is used. "
        "Several processes: torchrun --nproc_per_node N -m mlla.cli train ...",
        argument_default=_S,
    )
    add_run_arguments(
        p, sorted(PRESETS), preset_help="recipe preset (default: the model's own if it has one, 'demo' without --data-dir)",
        default_output="runs/MODEL",
    )

    g = p.add_argument_group("model")
    g.add_argument("--model", help="registered model name (see `mlla models`)")
    g.add_argument("--model-kwargs", nargs="*", metavar="NAME=VALUE", help="extra model arguments, e.g. embed_dim=32 depths=1,2,2,1")
    g.add_argument("--num-classes", type=int, help="check the data has this many classes")
    g.add_argument("--drop-path", type=_optional(float), help="stochastic depth rate (default: the model's)")
    g.add_argument("--initial-checkpoint", help="start from these weights (a new classifier is allowed: fine-tuning); "
                   "a training checkpoint gives its raw weights")
    g.add_argument("--initial-checkpoint-ema", action=_BOOL, help="take the EMA weights of --initial-checkpoint instead")
    g.add_argument("--grad-checkpointing", action=_BOOL, help="recompute activations in backward (less memory)")
    g.add_argument("--channels-last", action=_BOOL, help="channels-last input memory format")
    g.add_argument("--sync-bn", action=_BOOL, help="BatchNorm statistics over all processes")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="ImageFolder root (default: generate the demo dataset in OUTPUT/demo_data)")
    g.add_argument("--train-split")
    g.add_argument("--val-split")
    g.add_argument("--img-size", type=int)
    g.add_argument("-j", "--workers", type=_optional(int), help="data loading processes per training process "
                   "(default: up to 4, no more than the cores)")
    g.add_argument("--max-failed-fraction", type=float, help="stop when more than this fraction of an epoch's "
                   "samples fail to load or transform (default 0.01; failed samples are skipped and logged)")

    g = p.add_argument_group("optimizer and schedule (learning rates at a total batch of --lr-base-size)")
    g.add_argument("--opt", help="timm optimizer name (adamw)")
    g.add_argument("--opt-betas", type=_pair)
    g.add_argument("--opt-eps", type=float)
    g.add_argument("--weight-decay", type=float, help="not applied to norms and biases")
    g.add_argument("--lr", type=_optional(float), help="absolute peak learning rate (overrides --lr-base scaling)")
    g.add_argument("--lr-base", type=float)
    g.add_argument("--warmup-lr-base", type=float)
    g.add_argument("--min-lr-base", type=float)
    g.add_argument("--lr-base-size", type=int)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--warmup-steps", type=_optional(int), help="warm-up in optimizer steps (overrides --warmup-epochs)")
    g.add_argument("--sched", choices=["cosine", "step", "poly"], help="decay after the warm-up (default: cosine)")
    g.add_argument("--decay-milestones", type=_floats, help="epochs at which 'step' multiplies the rate by --decay-rate, e.g. 8,11")
    g.add_argument("--decay-rate", type=float)
    g.add_argument("--poly-power", type=float, help="exponent of the 'poly' decay")
    g.add_argument("--clip-grad", type=_optional(float), help="gradient norm clip (none: off)")
    g.add_argument("--amp", action=_BOOL, help="mixed precision")
    g.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"])

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action=_BOOL, help="no augmentation at all (the evaluation transform)")
    g.add_argument("--scale", type=_pair, help="random resized crop area range, e.g. 0.08,1")
    g.add_argument("--hflip", type=float)
    g.add_argument("--aa", type=_optional(str), help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (none: off)")
    g.add_argument("--color-jitter", type=float)
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode")
    g.add_argument("--mixup", type=float, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float)
    g.add_argument("--mixup-switch-prob", type=float)
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--interpolation")
    g.add_argument("--crop-pct", type=float, help="evaluation centre crop fraction")
    g.add_argument("--model-ema", action=_BOOL, help="keep an EMA of the weights (evaluated every epoch)")
    g.add_argument("--model-ema-decay", type=float)
    g.add_argument("--model-ema-decay-batch", type=int, help="total batch the decay is given for (0: use as is)")
    g.add_argument("--mesa", type=float, help="MESA weight (0: off)")
    g.add_argument("--mesa-start", type=float, help="fraction of the epochs before MESA starts")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the :class:`TrainConfig` for parsed ``mlla train`` arguments."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "model_kwargs" in given:
        given["model_kwargs"] = parse_kwargs(given["model_kwargs"])
    preset = getattr(args, "preset", None)
    if preset is None and "config" not in vars(args):
        if "data_dir" not in given and "model" not in given:
            preset = "demo"
        elif given.get("model") in PRESETS:
            preset = given["model"]
    return resolve_config(preset, getattr(args, "config", None), given)


def run(args: argparse.Namespace) -> int:
    from ..engine.trainer import fit

    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    summary = fit(cfg)
    if summary["status"] == "interrupted":
        return 0
    last = summary["last"]
    if "val_top1" in last:
        ema = f", EMA {last['ema_top1']:.2f}%" if "ema_top1" in last else ""
        print(f"validation top-1 after {summary['epoch']} epochs: {last['val_top1']:.2f}%{ema} "
              f"(best {summary['best']['score']:.2f}%); checkpoints, metrics and plot in {summary['output']}")
    return 0
