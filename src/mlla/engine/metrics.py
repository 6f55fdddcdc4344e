"""Per-epoch metrics: appended to ``metrics.jsonl`` and ``metrics.csv``, optionally to
TensorBoard, and drawn as ``metrics.png`` (loss and the task's main metric). Only rank 0 writes."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_save

__all__ = ["METRIC_FIELDS", "MetricsLog", "plot_metrics"]

_logger = logging.getLogger(__name__)

#: The columns every task's rows have, first in ``metrics.csv``; the task's own follow.
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_skipped", "epoch_time_s", "train_img_per_s")


def _csv_fields(rows: list[dict[str, Any]]) -> list[str]:
    extra = dict.fromkeys(k for r in rows for k in r if k not in METRIC_FIELDS)
    return [*METRIC_FIELDS, *extra]


class MetricsLog:
    """Appends one row per epoch; ``epoch`` counts from 1 (the epochs done), as the log and the
    plot do. ``start_epoch``: the epochs already done (on resume); later rows are dropped, and
    so is a last line cut short by a killed process. ``metrics.csv`` is rewritten from the same
    rows, so the two files always agree."""

    def __init__(self, output: Path, *, start_epoch: int = 0, tensorboard: bool = False) -> None:
        self.jsonl, self.csv = output / "metrics.jsonl", output / "metrics.csv"
        self.rows = [r for r in self._read() if r["epoch"] <= start_epoch]
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except ImportError:
                _logger.warning("--tensorboard: the tensorboard package is not installed (pip install tensorboard); skipping it")

    def _read(self) -> list[dict[str, Any]]:
        if not self.jsonl.is_file():
            return []
        rows, broken = [], 0
        for line in self.jsonl.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                broken += 1  # a line cut short when a run was killed mid-write
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
            else:
                broken += 1
        if broken:
            _logger.warning("%s: dropped %d incomplete line(s) left by an interrupted run", self.jsonl, broken)
        return rows

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_save(lambda tmp: Path(tmp).write_text(text), self.jsonl)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_csv_fields(self.rows))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), self.csv)

    def append(self, row: dict[str, Any]) -> None:
        fields = _csv_fields(self.rows)
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if _csv_fields(self.rows) != fields:  # new columns: rewrite the whole table
            self._rewrite()
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(
    rows: list[dict[str, Any]], path: Path, *, metric: str = "top1", metric_label: str = "top-1 (%)"
) -> Path | None:
    """Loss (train, val) and ``metric`` (``val_<metric>``, ``ema_<metric>``) per epoch as a PNG;
    None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if any(r.get(key) is not None for r in rows):
            ax_loss.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    for key, label in ((f"val_{metric}", "model"), (f"ema_{metric}", "EMA")):
        if any(r.get(key) is not None for r in rows):
            ax_acc.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel=metric_label or metric, title=f"validation {metric_label or metric}")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    plt.close(fig)
    return path
