"""``mlla train``: train a classifier with the paper's recipe (or a preset, a YAML file and flags)
on an ImageFolder, or on the generated demo dataset when no data is given. The flags are the
fields of :class:`~mlla.tasks.classification.settings.ClassificationConfig`.

Run it under ``torchrun --nproc_per_node N -m mlla.cli train ...`` for several processes.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..tasks.classification.task import ClassificationTask
from ._task import add_train_command


def register(subparsers: argparse._SubParsersAction) -> None:
    add_train_command(
        subparsers, "train", ClassificationTask, report=_report,
        preset_help="recipe preset (default: the model's own if it has one, 'demo' without --data-dir)",
        help="train with the paper's recipe (presets mlla_tiny/small/base, finetune, demo)",
        description="Train on an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*). Settings: defaults < "
        "--preset < --config YAML < flags. Without --data-dir the generated demo dataset is used. "
        "Several processes: torchrun --nproc_per_node N -m mlla.cli train ...",
    )


def _report(summary: dict[str, Any]) -> None:
    last = summary["last"]
    if "val_top1" in last:
        ema = f", EMA {last['ema_top1']:.2f}%" if "ema_top1" in last else ""
        print(f"validation top-1 after {summary['epoch']} epochs: {last['val_top1']:.2f}%{ema} "
              f"(best {summary['best']['score']:.2f}%); checkpoints, metrics and plot in {summary['output']}")
