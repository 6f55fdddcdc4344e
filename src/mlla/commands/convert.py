"""``mlla convert IN OUT.safetensors``: the authors' checkpoint layout to ours."""
from __future__ import annotations

import argparse
import json
import logging
import re

from ..checkpoint import read_checkpoint, save_state_dict, select_weights
from ..models.mlla import checkpoint_filter_fn

_logger = logging.getLogger(__name__)


def _registered_sizes() -> dict[str, tuple[int, tuple[int, ...]]]:
    """``name -> (embed_dim, depths)`` of the registered MLLA-T/S/B, read from models built on meta."""
    import timm
    import torch

    sizes = {}
    with torch.device("meta"):
        for name in ("mlla_tiny", "mlla_small", "mlla_base"):
            model = timm.create_model(name)
            sizes[name] = (model.stages[0].dim, tuple(len(stage.blocks) for stage in model.stages))
    return sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an MLLA checkpoint (authors' .pth, backbone or mmdet layout) to this package's .safetensors",
    )
    p.add_argument("input", help="checkpoint to read (.pth/.pt/.safetensors)")
    p.add_argument("output", help="file to write (.safetensors)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow any Python object in a .pth (runs code from the file); only for files from a source you trust",
    )
    p.add_argument("--use-ema", action="store_true", help="convert a training checkpoint's EMA weights instead of its raw ones")
    p.set_defaults(func=run)


def describe_mlla_state_dict(state_dict: dict) -> dict:
    """Size of the MLLA model a state dict (our layout) is for: embed_dim, depths, classes, mode."""
    if "stem.proj.conv.weight" not in state_dict:
        raise ValueError("not an MLLA checkpoint: no stem weights (stem.proj / patch_embed.conv3) found")
    depths: dict[int, set[int]] = {}
    for k in state_dict:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            depths.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    info = dict(
        embed_dim=int(state_dict["stem.proj.conv.weight"].shape[0]),
        depths=[len(depths[i]) for i in sorted(depths)],
        layout="backbone" if any(k.startswith("stage_norms.") for k in state_dict) else "classification",
    )
    if "head.fc.weight" in state_dict:
        info["num_classes"] = int(state_dict["head.fc.weight"].shape[0])
    info["model"] = next(
        (name for name, (dim, d) in _registered_sizes().items() if dim == info["embed_dim"] and tuple(info["depths"]) == d), "custom"
    )
    return info


def run(args: argparse.Namespace) -> int:
    if not args.output.endswith(".safetensors"):
        raise ValueError(f"output must end in .safetensors, got {args.output!r}")
    checkpoint = read_checkpoint(args.input, trust_pickle=args.trust_pickle)
    state_dict = checkpoint_filter_fn(select_weights(checkpoint, use_ema=args.use_ema, source=args.input))
    info = describe_mlla_state_dict(state_dict)
    save_state_dict(state_dict, args.output, metadata={"mlla": json.dumps(info)})
    print(f"wrote {args.output}: {len(state_dict)} tensors, {json.dumps(info)}")
    return 0
