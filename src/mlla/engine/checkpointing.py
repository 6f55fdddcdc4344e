"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a ``.pth`` dict readable with ``torch.load(weights_only=True)`` (tensors and
plain Python values only): ``model``, ``model_ema``, ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` and ``step_in_epoch`` (where to continue), ``global_step``, ``best``, ``per_rank`` (each
process's ``rng``: python, numpy, torch, CUDA, and ``meters``: the partial epoch's sums; checkpoints of
older versions hold rank 0's as top-level ``rng`` and ``meters``), ``config`` and the task's state
(e.g. ``class_to_idx``).
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_save, load_weights, read_checkpoint

__all__ = [
    "RUN_FILES",
    "capture_rng",
    "discard_failed_run",
    "find_resume",
    "load_model_weights",
    "prepare_output",
    "remove_stale_temp_files",
    "restore_rng",
    "save_checkpoint",
]

#: What a run writes in its folder besides checkpoints (removed again when a run fails before
#: its first checkpoint).
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "metrics.png")

_logger = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The state of python's, numpy's, torch's (and CUDA's) global generators, as tensors/ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, gauss=gauss),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write ``state`` (temp file, fsync, rename)."""
    return atomic_save(lambda tmp: torch.save(state, tmp), path)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files :func:`~mlla.checkpoint.atomic_save` leaves in ``folder``
    when its process is killed mid-write (never a complete file: the rename had not happened).
    Returns what was removed."""
    removed = []
    if folder.is_dir():
        for tmp in sorted(folder.glob(".*.tmp")):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        _logger.info("removed %d unfinished temporary file(s) of an earlier, killed run: %s", len(removed),
                     ", ".join(p.name for p in removed))
    return removed


def prepare_output(output: Path) -> bool:
    """Make the run folder ``output`` (checked with :func:`~mlla.engine.preflight.check_output`
    first) and clear an earlier killed run's temporary files. Returns True when it was created
    now (see :func:`discard_failed_run`)."""
    from .preflight import check_output

    check_output(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(output)
    return created


def discard_failed_run(output: Path) -> bool:
    """After a run failed before its first checkpoint: delete what it wrote (:data:`RUN_FILES`,
    temporary files) and ``output`` itself when that leaves it empty. Returns True if removed."""
    if not output.is_dir() or (output / "last.pth").exists() or (output / "best.pth").exists():
        return False
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    remove_stale_temp_files(output)
    try:
        output.rmdir()
    except OSError:  # something else lives there (e.g. the generated demo data): keep it
        return False
    return True


def find_resume(resume: str | None, output: Path) -> Path | None:
    """The checkpoint to continue from: ``'auto'`` -> ``output/last.pth`` if present (logged
    either way: what it resumes from, or that it starts fresh and which checkpoints it found instead)."""
    if not resume:
        return None
    if resume == "auto":
        last = output / "last.pth"
        if last.is_file():
            _logger.info("--resume auto: continuing from %s", last)
            return last
        others = sorted(p.name for p in output.glob("*.pth")) if output.is_dir() else []
        if others:
            _logger.warning(
                "--resume auto: no %s to continue from (found only %s, which keeps no optimizer state): starting fresh; "
                "to start from its weights instead, give --initial-checkpoint %s and a new --output",
                last, ", ".join(others), output / others[0],
            )
        else:
            _logger.info("--resume auto: no checkpoint in %s yet, starting fresh", output)
        return None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


def load_model_weights(model: nn.Module, path: str | os.PathLike, *, use_ema: bool = False) -> dict[str, Any]:
    """Load a model's weights from ``path`` (ours, the authors' layout or a bare state dict) by
    :func:`mlla.checkpoint.select_weights`' rule: raw weights, or the EMA ones with ``use_ema``.

    Returns the file's entries other than weights (e.g. ``class_to_idx``, ``epoch``). Raises
    :class:`~mlla.CheckpointError` when the weights do not fit (e.g. another number of classes).
    """
    ckpt = read_checkpoint(path)
    load_weights(model, ckpt, source=str(path), use_ema=use_ema)
    return {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor)) or k in ("class_to_idx", "best")}
