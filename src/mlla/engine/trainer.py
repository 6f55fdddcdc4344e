"""The training engine: one loop for every task, on one process or many, resumable.

Per step: the task's loss of a batch under autocast (with ``--compile``, the model through
``torch.compile``) -> the step's one read of the loss from the device; all processes agree it is
finite and whether to stop -> backward, gradient clipping, optimizer step -> per-step learning rate -> EMA
update. Per epoch: the task's evaluation of the model and of its EMA, a metrics row, ``last.pth``
(and ``best.pth``). SIGTERM/SIGINT finish the current step, save ``last.pth`` and return;
``--resume auto`` continues bit for bit. What a task computes lives in :mod:`mlla.engine.task`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import CheckpointError, read_checkpoint
from ..data import build_loader
from ..ops import attention_backend
from .checkpointing import capture_rng, discard_failed_run, find_resume, prepare_output, restore_rng, save_checkpoint
from .config import TrainConfig, save_yaml
from .distributed import DistEnv, all_reduce_sum, convert_sync_batchnorm, destroy_distributed, init_distributed
from .metrics import MetricsLog, plot_metrics
from .preflight import check_attention_backend_applies, check_schedule, check_settings
from .schedule import build_scheduler
from .task import Task

__all__ = ["Trainer", "fit"]

_logger = logging.getLogger(__name__)


def fit(cfg: TrainConfig, *, task: Task | None = None, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says (joining ``torchrun``'s process group if there is one).

    ``task`` defaults to the one whose settings class ``cfg`` is. ``on_step(global_step)`` is called after
    every optimizer step. Returns a summary: ``status`` ('finished' or 'interrupted'),
    ``output``, ``epoch`` (epochs done), ``best`` (``score``: the best raw or EMA value of the
    task's ``best_metric``, or minus the training loss without validation, and its ``epoch``)
    and ``last`` (the last metrics row), ``is_main`` (whether this process reports: rank 0). Raises RuntimeError on a non-finite loss (the last good
    checkpoint is kept).
    """
    env = init_distributed(cfg.device)
    created = not cfg.run_dir().exists()
    try:
        return Trainer(cfg, env, task=task, on_step=on_step).run()
    except BaseException:
        if env.is_main and created:
            discard_failed_run(cfg.run_dir())  # no empty run folder left behind
        raise
    finally:
        destroy_distributed()


class _StopOnSignal:
    """Turns the first SIGTERM/SIGINT into a stop request; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = True
        _logger.warning("%s received: saving a checkpoint after this step (send it again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds the task's data and model, the EMA, optimizer and schedule from ``cfg``, and runs the epochs."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv = DistEnv(),
        *,
        task: Task | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if not cfg.model:
            raise ValueError("no model given: pass --model NAME (see `mlla models`) or a --preset")
        self.cfg, self.env, self.on_step = cfg, env, on_step
        self.output = cfg.run_dir()
        self.task = task or Task.for_settings(cfg)
        check_settings(cfg, env.world_size, output=self.output, task=self.task, device=env.device, log=env.is_main)  # before any work
        self.resume_from = find_resume(cfg.resume, self.output)
        if self.resume_from is None and (self.output / "last.pth").is_file():
            raise ValueError(
                f"{self.output} already holds a run (last.pth); continue it with --resume auto or choose another --output"
            )
        if env.is_main:
            prepare_output(self.output)  # also clears a killed run's temporary files
        self.stop = _StopOnSignal()
        self._seed_everything(cfg.seed)
        self._build_data()
        self._build_model()
        self._build_optimization()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict[str, float] = {}
        self.meters: dict[str, float] = {}  # the partial epoch's sums: loss, steps, images, skipped, loss parts
        rng = self._resume() if self.resume_from else None
        if env.is_main:
            save_yaml(cfg, self.output / "config.yaml")
            self.metrics = MetricsLog(self.output, start_epoch=self.epoch, tensorboard=cfg.tensorboard)
        if rng is not None:
            restore_rng(rng)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _barrier(self) -> None:
        if self.env.distributed:
            torch.distributed.barrier()

    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        root = cfg.data_dir
        if root is None:
            root = self.output / "demo_data"
            if env.is_main:
                _logger.info("no --data-dir: using the generated demo dataset in %s", root)
                self.task.make_demo_data(root, progress=cfg.progress)
            self._barrier()
        self.data_dir = Path(root)
        self.train_set, self.val_set = self.task.build_datasets(self.data_dir, env)
        global_batch = cfg.batch_size * env.world_size
        if len(self.train_set) < global_batch:
            raise ValueError(
                f"the training set has {len(self.train_set)} samples, fewer than one batch of {global_batch} "
                f"({cfg.batch_size} x {env.world_size} processes); lower --batch-size"
            )
        loader_args = dict(
            workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
            pin_memory=env.device.type == "cuda", collate_fn=self.task.collate, max_failed_fraction=cfg.max_failed_fraction,
        )
        self.train_loader = build_loader(self.train_set, cfg.batch_size, is_training=True, **loader_args)
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = build_loader(self.val_set, cfg.batch_size, is_training=False, **loader_args)

    def _build_model(self) -> None:
        cfg, env = self.cfg, self.env
        model = self.task.build_model()
        check_attention_backend_applies(cfg.attention_backend, model, cfg.model)
        if cfg.attention_backend in ("torch", "triton") and env.is_main:
            form = "the fused Triton kernel" if cfg.attention_backend == "triton" else "the PyTorch form"
            _logger.info("MLLA's attention runs as %s (--attention-backend %s)", form, cfg.attention_backend)
        if cfg.sync_bn and env.distributed:
            model = convert_sync_batchnorm(model, env.device)
        model.to(env.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the bare model: saved, evaluated, averaged into the EMA
        global_batch = cfg.batch_size * env.world_size
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay(global_batch)) if cfg.model_ema else None
        self.ddp_model = (
            DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters,
            )
            if env.distributed else model
        )
        self.train_model = self._compiled(self.ddp_model) if cfg.compile else self.ddp_model  # what the steps call

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (DDP-wrapped under torchrun) through ``torch.compile`` with ``--compile-backend``
        and ``--compile-mode``; ``self.model`` stays the bare module that is saved and evaluated."""
        cfg = self.cfg
        _logger.info("the training step's model runs through torch.compile (backend %s, mode %s): the first steps "
                     "compile it, which takes minutes; evaluation stays eager", cfg.compile_backend, cfg.compile_mode)
        return torch.compile(model, backend=cfg.compile_backend, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    def _build_optimization(self) -> None:
        cfg, env = self.cfg, self.env
        global_batch = cfg.batch_size * env.world_size
        self.lr, warmup_lr, min_lr = cfg.scaled_lrs(global_batch)
        self.optimizer = create_optimizer_v2(
            self.model, cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps
        )
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler, warmup = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, warmup_lr, min_lr)
        check_schedule(cfg, global_batch, self.steps_per_epoch, log=env.is_main and self.resume_from is None)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        _logger.info(
            "%s: %d process(es) x batch %d = %d images/step, %d steps/epoch; lr %.3g (warm-up %d steps from %.3g, %s to %.3g)%s",
            self.task.name, env.world_size, cfg.batch_size, global_batch, self.steps_per_epoch, self.lr, warmup,
            warmup_lr, cfg.sched, min_lr, f"; EMA decay {cfg.ema_decay(global_batch):.6f}" if self.ema else "",
        )

    def _amp_dtype(self) -> torch.dtype | None:
        cfg, device = self.cfg, self.env.device
        if not cfg.amp:
            return None
        if cfg.amp_dtype == "auto":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16
            return torch.bfloat16
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
        if dtype is None:
            raise ValueError(f"--amp-dtype must be auto, bfloat16 or float16, got {cfg.amp_dtype!r}")
        if dtype == torch.float16 and device.type != "cuda":
            raise ValueError("float16 autocast needs a GPU; use --amp-dtype bfloat16 on CPU")
        return dtype

    def autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _resume(self) -> dict[str, Any]:
        ckpt = read_checkpoint(self.resume_from)
        self.task.check_resume(ckpt, self.resume_from)
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(ckpt.get("model_ema") or ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {self.resume_from} with this configuration: {str(e).splitlines()[0]}") from e
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.best = dict(ckpt["best"])
        _logger.info("resumed from %s: epoch %d, step %d of %d", self.resume_from, self.epoch + 1, self.step_in_epoch, self.steps_per_epoch)
        per_rank = ckpt.get("per_rank") or [dict(rng=ckpt["rng"], meters=ckpt["meters"])]  # older: rank 0's only
        if len(per_rank) == self.env.world_size:  # each process continues where it was
            self.meters = dict(per_rank[self.env.rank]["meters"])
            return per_rank[self.env.rank]["rng"]
        self.meters = {}  # another number of processes: the partial epoch's sums all go to rank 0
        if self.env.is_main:
            for own in per_rank:
                self._count(**own["meters"])
        return per_rank[0]["rng"]

    # ------------------------------------------------------------------------- checkpoints
    def _state(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(
            model=self.model.state_dict(),
            model_ema=self.ema.module.state_dict() if self.ema else None,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            global_step=self.global_step,
            best=self.best,
            # each process's own random state (e.g. detection's anchor sampling) and partial sums
            per_rank=per_rank,
            config=self.cfg.to_dict(),
            **self.task.state(),
        )

    def save_last(self) -> None:
        """Write ``last.pth`` (rank 0); a collective call: every process's random state and
        partial-epoch sums go in."""
        own = dict(rng=capture_rng(), meters=dict(self.meters))
        per_rank = [own]
        if self.env.distributed:
            per_rank = [None] * self.env.world_size
            torch.distributed.all_gather_object(per_rank, own)
        if self.env.is_main:
            save_checkpoint(self._state(per_rank), self.output / "last.pth")

    def _save_best(self, row: dict[str, Any]) -> None:
        metric = self.task.best_metric
        candidates = [row[k] for k in (f"val_{metric}", f"ema_{metric}") if row.get(k) is not None]
        score = max(candidates, default=-row["train_loss"])
        if score <= self.best.get("score", -math.inf):
            return
        self.best = dict(score=score, epoch=row["epoch"])
        if self.env.is_main:
            save_checkpoint(
                dict(
                    model=self.model.state_dict(), model_ema=self.ema.module.state_dict() if self.ema else None,
                    epoch=row["epoch"], metrics=row, config=self.cfg.to_dict(), **self.task.state(),
                ),
                self.output / "best.pth",
            )

    # ------------------------------------------------------------------------------ loop
    def _agree(self, loss: torch.Tensor) -> tuple[float, bool, bool]:
        """(this process's loss, every process's loss is finite, some process was asked to stop):
        the step's one wait for the device (the loss, before the backward) and one all-reduce, so
        all processes raise or stop at the same step."""
        value = loss.detach().float().item()
        flags = torch.tensor([float(not math.isfinite(value)), float(self.stop.requested)])
        flags = all_reduce_sum(flags, self.env)
        return value, bool(flags[0] == 0), bool(flags[1] > 0)

    def _nonfinite_error(self, loss: float, batch: int) -> RuntimeError:
        last = self.output / "last.pth"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
        return RuntimeError(
            f"loss became {loss} at epoch {self.epoch + 1}, step {batch + 1} (global step {self.global_step + 1}); "
            f"stopped without saving: {kept}. Lower --lr, set --clip-grad, or turn off --amp, then --resume auto"
        )

    def _count(self, **values: float) -> None:
        for k, v in values.items():
            self.meters[k] = self.meters.get(k, 0.0) + float(v)

    def train_one_epoch(self) -> bool:
        """Run the rest of epoch ``self.epoch``; False when stopped by a signal (state saved)."""
        cfg, env = self.cfg, self.env
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)
        self.train_loader.sampler.set_epoch(self.epoch, start=self.step_in_epoch * cfg.batch_size)
        ema = self.ema.module if self.ema is not None else None
        self.train_model.train()
        bar = tqdm(
            self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", initial=self.step_in_epoch,
            total=self.steps_per_epoch, disable=not (cfg.progress and env.is_main), dynamic_ncols=True,
        )
        for inputs, targets, skipped in bar:
            inputs, targets = self.task.to_device(inputs, targets, env.device)
            with self.autocast():
                loss, parts = self.task.training_loss(self.train_model, inputs, targets, ema=ema, epoch=self.epoch)
            loss_value, finite, stop = self._agree(loss)
            if not finite:
                raise self._nonfinite_error(loss_value, self.step_in_epoch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            self.step_in_epoch += 1
            self.scheduler.step_update(self.global_step)
            if self.ema is not None:
                self.ema.update(self.model)
            self._count(loss=loss_value, steps=1, images=self.task.num_images(inputs), skipped=skipped, **parts)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
            if self.on_step is not None:
                self.on_step(self.global_step)
            if stop or (cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0):
                self.save_last()  # at a step boundary: a resumed run continues from here
            if stop:
                bar.close()
                return False
        bar.close()
        return True

    def _end_epoch(self, seconds: float) -> dict[str, Any]:
        names = sorted(self.meters)  # the same order on every process
        sums = all_reduce_sum(torch.tensor([self.meters[k] for k in names], dtype=torch.float64), self.env)
        totals = dict(zip(names, sums.tolist()))
        steps = max(totals.pop("steps", 0.0), 1.0)
        row: dict[str, Any] = dict(
            epoch=self.epoch + 1, step=self.global_step, lr=self.optimizer.param_groups[0]["lr"],
            train_loss=totals.pop("loss", 0.0) / steps, train_skipped=int(totals.pop("skipped", 0.0)),
        )
        images = totals.pop("images", 0.0)
        row.update({f"train_{k}": v / steps for k, v in totals.items()})  # the task's loss parts
        if self.val_loader is not None:
            eval_args = dict(autocast=self.autocast, progress=self.cfg.progress)
            raw = self.task.evaluate(self.model, self.val_loader, self.env, desc="validate", **eval_args)
            row.update({f"val_{k}": v for k, v in raw.items()})
            if self.ema is not None:
                ema = self.task.evaluate(self.ema.module, self.val_loader, self.env, desc="validate EMA", **eval_args)
                row.update({f"ema_{k}": v for k, v in ema.items() if k != "skipped"})
        row.update(epoch_time_s=seconds, train_img_per_s=images / max(seconds, 1e-9))
        return row

    def _log_epoch(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}", f"train loss {row['train_loss']:.4f}"]
        for prefix, label in (("val_", "val"), ("ema_", "EMA")):
            metrics = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            if metrics:
                parts.append(f"{label} {self.task.describe(metrics)}")
        skipped = row["train_skipped"] + row.get("val_skipped", 0)
        parts.append(f"{skipped} failed samples skipped (logged above)" if skipped else "no failed samples")
        parts.append(f"{row['train_img_per_s']:.0f} img/s")
        _logger.info(", ".join(parts))

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary described in :func:`fit`."""
        cfg, env = self.cfg, self.env
        row: dict[str, Any] = {}
        status = "finished"
        backend = attention_backend(cfg.attention_backend) if cfg.attention_backend else contextlib.nullcontext()
        with self.stop, backend:
            while self.epoch < cfg.epochs:
                start = time.perf_counter()
                if not self.train_one_epoch():
                    status = "interrupted"
                    break
                row = self._end_epoch(time.perf_counter() - start)
                self._save_best(row)
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.meters = {}
                if env.is_main:  # the row before last.pth: a kill in between redoes the epoch, no gap
                    self.metrics.append(row)
                    plot_metrics(self.metrics.rows, self.output / "metrics.png", metric=self.task.best_metric,
                                 metric_label=self.task.best_metric_label)
                    self._log_epoch(row)
                self.save_last()
                _, _, stop = self._agree(torch.zeros(()))
                if stop:
                    status = "interrupted"
                    break
        if env.is_main:
            self.metrics.close()
            if not row and self.metrics.rows:  # resumed a finished run: report where it ended
                row = self.metrics.rows[-1]
            if status == "interrupted":
                _logger.warning("stopped at epoch %d step %d: continue with --resume auto --output %s",
                                self.epoch + 1, self.step_in_epoch, self.output)
        self._barrier()
        return dict(status=status, output=str(self.output), epoch=self.epoch, best=self.best, last=row, is_main=env.is_main)
