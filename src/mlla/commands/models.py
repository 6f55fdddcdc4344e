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


#: The backbones of the paper's detection and segmentation models.
_DENSE_BACKBONES = ("mlla_tiny", "mlla_small", "mlla_base")


def _paper(name: str) -> dict[str, float]:
    """The paper's figures of ``name`` as ``paper_<figure>`` columns."""
    return {f"paper_{k}": v for k, v in PAPER_RESULTS.get(name, {}).items()}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _detection_rows(pattern: str) -> list[dict]:
    """Mask R-CNN at 1280x800 on MLLA-T/S/B (named ``mask_rcnn_<backbone>``) matching ``pattern``."""
    from fnmatch import fnmatch

    from ..tasks.detection.stats import detection_model_stats

    rows = []
    for backbone in _DENSE_BACKBONES:
        if not pattern or fnmatch(f"mask_rcnn_{backbone}", pattern):
            stats = detection_model_stats(backbone)
            stats.pop("gmacs_by_part")
            rows.append(dict(stats, **_paper(stats["model"])))
    return rows


def _segmentation_rows(pattern: str) -> list[dict]:
    """UperNet (ADE20K, 150 classes) at 512x2048 on MLLA-T/S/B (named ``upernet_<backbone>``) matching ``pattern``."""
    from fnmatch import fnmatch

    from ..tasks.segmentation.model import upernet_stats

    rows = []
    for backbone in _DENSE_BACKBONES:
        if not pattern or fnmatch(f"upernet_{backbone}", pattern):
            rows.append(dict(model=f"upernet_{backbone}", **upernet_stats(backbone), **_paper(f"upernet_{backbone}")))
    return rows


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    detection = _detection_rows(args.pattern)
    segmentation = _segmentation_rows(args.pattern)
    if not names and not detection and not segmentation:
        raise ValueError(f"no model matches {args.pattern!r}; run `mlla models` for the full list")
    rows = []
    for name in names:
        rows.append(dict(model=name, **model_stats(name, args.img_size), **_paper(name)))
    if args.json:
        print(json.dumps(rows + detection + segmentation, indent=1))
        return 0
    if rows:
        _print_table(rows, args.img_size)
    if detection:
        _print_detection_table(detection)
    if segmentation:
        _print_segmentation_table(segmentation)
    return 0


def _print_detection_table(rows: list[dict]) -> None:
    header = f"{'detector (COCO, 80 classes)':<34}{'params (M)':>11}{'GMACs':>11}   {'paper: params':>13}{'GFLOPs':>7}{'box AP':>7}{'mask AP':>8}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<34}{r['params_m']:>11.2f}{r['gmacs']:>11.1f}   {r['paper_params_m']:>12.0f}M{r['paper_gmacs']:>7.0f}"
              f"{r['paper_box_ap']:>7.1f}{r['paper_mask_ap']:>8.1f}")
    print("\nMask R-CNN (torchvision parts, FPN 256) at 1280x800, counted as mmdetection does for the paper: backbone,\n"
          "FPN and RPN head on the image, box head on 1000 RoIs, mask head on 100 (mlla.tasks.detection.stats).")


def _print_segmentation_table(rows: list[dict]) -> None:
    header = f"{'segmenter (ADE20K, 150 classes)':<34}{'params (M)':>11}{'GMACs':>11}   {'paper: params':>13}{'GFLOPs':>7}{'mIoU':>7}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<34}{r['params_m']:>11.2f}{r['gmacs']:>11.1f}   "
              f"{_fmt(r.get('paper_params_m'), '.0f') + ('M' if r.get('paper_params_m') else ''):>13}"
              f"{_fmt(r.get('paper_gmacs'), '.0f'):>7}{_fmt(r.get('paper_miou_ss'), '.1f'):>7}")
    print("\nUperNet (512 channels, FCN auxiliary head not counted) at 512x2048 (mlla.tasks.segmentation.model.upernet_stats).")


def _print_table(rows: list[dict], img_size: int) -> None:
    header = f"{'model':<34}{'params (M)':>11}{'GMACs@' + str(img_size):>11}   {'paper: params':>13}{'GMACs':>7}{'top-1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<34}{r['params_m']:>11.2f}{r['gmacs']:>11.2f}   "
            f"{_fmt(r.get('paper_params_m'), '.0f') + ('M' if r.get('paper_params_m') else ''):>13}{_fmt(r.get('paper_gmacs'), '.1f'):>7}{_fmt(r.get('paper_top1'), '.1f'):>7}"
        )
    print("\nparams and GMACs measured here (torch.utils.flop_counter FLOPs / 2); paper columns as published.")
