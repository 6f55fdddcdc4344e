"""Per-step learning-rate schedules (timm's schedulers): warm-up, then cosine, step or poly decay."""
from __future__ import annotations

from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from .config import TrainConfig

__all__ = ["SCHEDULES", "build_scheduler"]

SCHEDULES = ("cosine", "step", "poly")


def build_scheduler(
    optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int, warmup_lr: float, min_lr: float
) -> tuple[Scheduler, int]:
    """The run's schedule, updated every optimizer step; returns ``(scheduler, warm-up steps)``.

    ``cosine`` decays to ``min_lr`` over the steps after the warm-up (the paper's classification
    recipe); ``step`` multiplies the rate by ``decay_rate`` at each of ``decay_milestones``
    (epochs, the detection recipes); ``poly`` decays as ``(1 - t / T) ** poly_power`` to
    ``min_lr`` (the segmentation recipe). The warm-up is ``warmup_steps`` if set, else
    ``warmup_epochs`` epochs, rising linearly from ``warmup_lr``.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total)
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if cfg.sched == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr, warmup_prefix=True, **common)
    elif cfg.sched == "step":
        # Milestones count from the start of training (warm-up included). timm's MultiStepLRScheduler
        # decays once t + 1 reaches a milestone and step_update(s) sets the rate of step s, so a
        # decay from step M on needs the milestone M + 1.
        milestones = [round(m * steps_per_epoch) + 1 for m in cfg.decay_milestones]
        scheduler = MultiStepLRScheduler(
            optimizer, decay_t=milestones, decay_rate=cfg.decay_rate, warmup_prefix=False, **common
        )
    elif cfg.sched == "poly":
        scheduler = PolyLRScheduler(
            optimizer, t_initial=max(1, total - warmup), power=cfg.poly_power, lr_min=min_lr, warmup_prefix=True, **common
        )
    else:
        raise ValueError(f"unknown --sched {cfg.sched!r}; choose one of {', '.join(SCHEDULES)}")
    scheduler.step_update(0)
    return scheduler, warmup
