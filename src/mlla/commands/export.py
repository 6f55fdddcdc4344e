"""``mlla export``: ONNX or torch.export file with dynamic batch and image size, checked against PyTorch."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

_NO_CHECK = ("none", "off", "0")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX or torch.export (dynamic batch and image size)",
        description="Fold BatchNorms, trace with dynamic batch/height/width (multiples of 32), write the "
        "file atomically, then run it (ONNX Runtime or the exported program) against PyTorch at --check-sizes.",
    )
    p.add_argument("--model", required=True, help="model name, e.g. mlla_tiny (see `mlla models`)")
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors or .pth; ours or the authors' layout)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's / checkpoint's)")
    p.add_argument("--features", action="store_true", help="export the features_only backbone (4 stage outputs)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch-export"], help="output format (default: onnx)")
    p.add_argument("--output", required=True, help="output file (.onnx or .pt2)")
    p.add_argument("--example-size", default="224", help="tracing size, N or HxW, multiple of 32 (default: 224)")
    p.add_argument("--min-size", type=int, default=64, help="smallest height/width the file accepts (default: 64)")
    p.add_argument("--max-size", type=int, default=4096, help="largest height/width the file accepts (default: 4096)")
    p.add_argument("--check-sizes", nargs="*", default=["224", "320x256", "512"],
                   help="sizes to compare against PyTorch after export (default: 224 320x256 512; 'none' skips the check)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed absolute difference (default: 1e-4)")
    p.set_defaults(func=run)


def check_output_path(output: str | os.PathLike) -> Path:
    """Refuse an ``--output`` that cannot be written, before the (long) export starts."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {path}: {parent} is a file, so nothing can be written under it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--output {path} is not writable by this user; choose a path in a folder you can write to")
    return path


def run(args: argparse.Namespace) -> int:
    import mlla

    from ..benchmark import parse_size
    from ..export import check_export, export_model

    check_output_path(args.output)
    check_sizes = [s for s in args.check_sizes if s.lower() not in _NO_CHECK]
    sizes = [parse_size(s) for s in check_sizes]  # bad sizes: an error now, not after the export
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.features:
        kwargs["features_only"] = True
    model = mlla.create_model(args.model, **kwargs).eval()
    if args.checkpoint:
        mlla.load_checkpoint(model, args.checkpoint)
    path = export_model(model, args.output, args.format, example_size=parse_size(args.example_size),
                        min_size=args.min_size, max_size=args.max_size)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.format})")
    if sizes:
        diffs = check_export(path, model, sizes, fmt=args.format)
        for size, diff in diffs.items():
            print(f"  {size}: max |exported - PyTorch| = {diff:.2e}")
        worst = max(diffs.values())
        if worst > args.tolerance:
            raise RuntimeError(f"exported outputs differ from PyTorch by {worst:.2e} > {args.tolerance:.0e}")
        print(f"outputs match PyTorch within {args.tolerance:.0e} at {', '.join(diffs)}")
    return 0
