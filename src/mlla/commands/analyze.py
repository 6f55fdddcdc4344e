"""``mlla analyze CHECKPOINT``: look inside a model: forget gate per layer, input-gate map,
spread of token norms with and without attention normalisation, effective receptive field."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tasks.study.analyze import ANALYSES

    p = subparsers.add_parser(
        "analyze",
        help="analyses of a trained model: forget/input gates, token norms, effective receptive field",
        description="Each analysis writes OUTPUT/<analysis>.png and its numbers (.json, .csv). CHECKPOINT is a "
        "training checkpoint (its config names the model), a weights file with --model, or a registered model "
        "name (random initialisation). A checkpoint is analysed beside its untrained twin (same model and seed) "
        "and, in an `mlla ablate` study, beside the same seed's baseline. Without --analyses every analysis that "
        "applies is run.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="last.pth/best.pth of a run, a weights file, or a model name")
    p.add_argument("--analyses", nargs="+", choices=ANALYSES, help="default: all that apply to the model")
    p.add_argument("--output", help="folder for the PNGs and numbers (default: analysis/ beside the checkpoint)")
    p.add_argument("--model", help="model name, for weights files without a training config")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="NAME=VALUE", help="model size for --model")
    p.add_argument("--img-size", type=int, help="input size (default: the training config's, else the model's)")
    p.add_argument("--images", help="folder of images (default: the validation split the checkpoint was trained on)")
    p.add_argument("--image", help="image for the input-gate map (default: the first of --images)")
    p.add_argument("--num-images", type=int, default=16, help="images averaged over (default 16)")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME[=CHECKPOINT]",
                   help="models beside it in the ERF and token-norm plots, e.g. swin_tiny_patch4_window7_224 convnext_tiny")
    p.add_argument("--baseline", help="checkpoint drawn beside it (default: the same seed's ablation_baseline when "
                   "CHECKPOINT is OUT/<variant>/seed<k>/... of an `mlla ablate` study)")
    p.add_argument("--erf-size", type=int, help="input size of the ERF (default: 8x8 tokens in the last stage)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..engine.config import parse_kwargs
    from ..tasks.study.analyze import analyze

    out = args.output
    if out is None:
        source = Path(args.checkpoint)
        out = source.parent / "analysis" if source.is_file() else Path("runs") / "analysis" / args.checkpoint
    written = analyze(
        args.checkpoint, args.analyses, out, model=args.model, model_kwargs=parse_kwargs(args.model_kwargs),
        img_size=args.img_size, images=args.images, image=args.image, num_images=args.num_images,
        compare=args.compare, baseline=args.baseline, erf_size=args.erf_size,
    )
    for kind, paths in written.items():
        print(f"{kind}: {', '.join(str(p) for p in paths)}")
    return 0
