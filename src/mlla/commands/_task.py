"""What the task commands share: a training command written from a task's settings
(``mlla train``, ``mlla det train``, ``mlla seg train``), the arguments of evaluating a run's
checkpoint (``det eval``, ``seg eval``) and of drawing predictions, and the failed-input limit."""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager

from ..engine.task import Task

__all__ = [
    "MAX_FAILED_HELP", "add_attention_backend_argument", "add_eval_arguments", "add_predict_arguments", "add_train_command",
    "check_failed", "checked_attention_backend", "eval_loader", "find_images",
]

_logger = logging.getLogger(__name__)

MAX_FAILED_HELP = ("stop when more than this fraction of the samples (summed over all processes) fail to load or "
                   "transform (default 0.01; failed samples are skipped, counted and logged)")


def add_train_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    task: type[Task],
    *,
    report: Callable[[dict[str, Any]], None],
    preset_help: str,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """The training command ``name`` of ``task``: a flag per setting, the task's presets;
    ``report(summary)`` prints the result of :func:`~mlla.engine.trainer.fit`."""
    from ..engine.flags import add_settings_arguments
    from ..tasks import TASKS

    p = subparsers.add_parser(name, argument_default=argparse.SUPPRESS, **parser_options)
    add_settings_arguments(p, task, others=TASKS, preset_help=preset_help)
    p.set_defaults(func=lambda args: _train(task, args, report))
    return p


def _train(task: type[Task], args: argparse.Namespace, report: Callable[[dict[str, Any]], None]) -> int:
    from ..engine.flags import print_settings, settings_from_args
    from ..engine.trainer import fit

    cfg = settings_from_args(task, args)
    if getattr(args, "print_config", False):
        print_settings(cfg)
        return 0
    summary = fit(cfg, task=task(cfg))
    if summary["status"] == "finished" and summary["is_main"]:  # once, not once per process
        report(summary)
    return 0


def add_attention_backend_argument(p: argparse.ArgumentParser) -> None:
    """``--attention-backend`` of a command that runs a model (the training commands have it as a setting)."""
    from ..ops.mlla_attn.backend import BACKENDS

    p.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                   help="how MLLA's attention runs: auto (default: the fused Triton kernel on CUDA, the PyTorch form "
                   "elsewhere), torch, or triton (CUDA only)")


def checked_attention_backend(args: argparse.Namespace, model: Any, device: Any) -> Callable[[], ContextManager[None]]:
    """A factory of contexts (a new one per call) that run their block with the command's
    ``--attention-backend``; raises a ValueError (a ``SettingsError`` for the model) where that
    backend cannot run on ``device`` or ``model`` has no MLLA attention."""
    from ..engine.preflight import check_attention_backend_applies
    from ..ops import attention_backend
    from ..ops.mlla_attn.backend import check_backend

    name = args.attention_backend
    check_backend(name, device.type, "--attention-backend")
    check_attention_backend_applies(name, model, f"this {type(model).__name__}")
    return functools.partial(attention_backend, name)


def add_eval_arguments(p: argparse.ArgumentParser, run: str) -> None:
    """``--checkpoint``, where the data is (by default the run's) and how to run the evaluation:
    the same for every task's ``eval`` command (``run``: the training command, for the help)."""
    p.add_argument("--checkpoint", required=True, help=f"last.pth or best.pth of a `{run}` run")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, or its generated demo data)")
    p.add_argument("--split", help="split to evaluate (default: the run's validation split)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("-b", "--batch-size", type=int, default=2, help="images per step (default 2)")
    p.add_argument("-j", "--workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--max-failed-fraction", type=float, default=0.01, help=MAX_FAILED_HELP)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    add_attention_backend_argument(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def eval_loader(task: Task, args: argparse.Namespace) -> tuple[Any, Path, str]:
    """``(loader, data folder, split)`` of an ``eval`` command: the flags' data, else the run's."""
    from ..data import build_loader

    cfg = task.cfg
    data_dir = Path(args.data_dir or cfg.data_dir or cfg.run_dir() / "demo_data")
    split = args.split or cfg.val_split
    dataset = task.build_eval_dataset(data_dir, split)
    loader = build_loader(dataset, args.batch_size, is_training=False, workers=args.workers, seed=0,
                          collate_fn=task.collate, max_failed_fraction=args.max_failed_fraction)
    return loader, data_dir, split


def add_predict_arguments(p: argparse.ArgumentParser, run: str) -> None:
    """Inputs, ``--checkpoint``, ``--use-ema``, ``--device`` and the failed-input limit of a ``predict`` command."""
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help=f"last.pth or best.pth of a `{run}` run")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of the checkpoint")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    add_attention_backend_argument(p)
    p.add_argument("--max-failed-fraction", type=float, default=1.0,
                   help="exit with an error when more than this fraction of the images cannot be read (default 1: "
                   "draw every readable image, skipping and counting the others; an error only when none is readable)")


def find_images(inputs: list[str], *, is_output: Callable[[Path], bool]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders: their images, leaving out our own
    pictures, for which ``is_output`` is true); raises when there are none."""
    from ..data import IMG_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMG_EXTENSIONS and not is_output(f))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {', '.join(inputs)}")
    return files


def check_failed(failed: int, total: int, limit: float) -> None:
    """Raise when more than ``limit`` of ``total`` inputs failed, or all of them (``predict`` commands)."""
    if failed and (failed > limit * total or failed == total):
        raise RuntimeError(f"{failed} of {total} images could not be read (see the warnings), more than "
                           f"--max-failed-fraction {limit:g} allows; fix or remove them, or raise --max-failed-fraction")
