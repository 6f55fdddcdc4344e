"""``mlla models``: every registered model with parameters and GMACs, beside the paper's."""
from __future__ import annotations

import argparse
import json

from ..models.registry import PAPER_RESULTS, list_models
from ..profiling import model_stats


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the models with parameters and GMACs (measured) beside the paper's")
    p.add_argument("pattern", nargs="?", default="", help="wildcard filter, e.g. 'mlla_*'")
    p.add_argument("--img-size", type=int, default=224, help="input size for the GMACs count (default 224)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; run `mlla models` for the full list")
    rows = []
    for name in names:
        stats = model_stats(name, args.img_size)
        paper = PAPER_RESULTS.get(name, {})
        rows.append(dict(model=name, **stats, **{f"paper_{k}": v for k, v in paper.items()}))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = f"{'model':<34}{'params (M)':>11}{'GMACs@' + str(args.img_size):>11}   {'paper: params':>13}{'GMACs':>7}{'top-1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<34}{r['params_m']:>11.2f}{r['gmacs']:>11.2f}   "
            f"{_fmt(r.get('paper_params_m'), '.0f') + ('M' if r.get('paper_params_m') else ''):>13}{_fmt(r.get('paper_gmacs'), '.1f'):>7}{_fmt(r.get('paper_top1'), '.1f'):>7}"
        )
    print("\nparams and GMACs measured here (torch.utils.flop_counter FLOPs / 2); paper columns as published.")
    _print_upernet(names)
    return 0


def _print_upernet(names: list[str]) -> None:
    """UperNet (ADE20K, 150 classes) at 512x2048 on the MLLA-T/S/B listed, beside the paper's."""
    from ..dense.segmentation import PAPER_UPERNET, upernet_stats

    backbones = [n for n in ("mlla_tiny", "mlla_small", "mlla_base") if n in names]
    if not backbones:
        return
    print(f"\n{'UperNet (ADE20K) at 512x2048':<34}{'params (M)':>11}{'GMACs':>9}   {'paper: params':>13}{'GMACs':>7}{'mIoU':>6}")
    for name in backbones:
        stats, paper = upernet_stats(name), PAPER_UPERNET.get(name, {})
        print(f"{'upernet + ' + name:<34}{stats['params_m']:>11.2f}{stats['gmacs']:>9.1f}   "
              f"{_fmt(paper.get('params_m'), '.0f') + ('M' if paper else ''):>13}{_fmt(paper.get('gmacs'), '.0f'):>7}"
              f"{_fmt(paper.get('miou_ss'), '.1f'):>6}")
