"""Per-epoch metrics: appended to ``metrics.jsonl`` and ``metrics.csv``, optionally to
TensorBoard, and drawn as ``metrics.png`` (loss and top-1 curves). Only rank 0 writes."""
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

METRIC_FIELDS = (
    "epoch", "step", "lr", "train_loss", "train_skipped", "val_loss", "val_top1", "val_top5",
    "ema_top1", "ema_top5", "val_skipped", "epoch_time_s", "train_img_per_s",
)


class MetricsLog:
    """Appends one row per epoch; on resume, rows from the epoch resumed onwards are dropped."""

    def __init__(self, output: Path, *, start_epoch: int = 0, tensorboard: bool = False) -> None:
        self.jsonl, self.csv = output / "metrics.jsonl", output / "metrics.csv"
        self.rows = [r for r in self._read() if r["epoch"] < start_epoch]
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
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_save(lambda tmp: Path(tmp).write_text(text), self.jsonl)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_save(lambda tmp: Path(tmp).write_text(buf.getvalue()), self.csv)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss (train, val) and top-1 (raw, EMA) per epoch as a PNG; None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if any(r.get(key) is not None for r in rows):
            ax_loss.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    for key, label in (("val_top1", "model"), ("ema_top1", "EMA")):
        if any(r.get(key) is not None for r in rows):
            ax_acc.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    plt.close(fig)
    return path
