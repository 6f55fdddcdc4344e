"""Data loaders whose sample order is a function of ``(seed, epoch)`` and that can start
mid-epoch (for resuming), on one process or many; they count failed samples
(:class:`~mlla.data.failures.FailureLog`) and their workers leave Ctrl-C to the main process."""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .dataset import collate_skipping
from .failures import FailureLog

__all__ = ["CountingLoader", "ResumableSampler", "available_cores", "build_loader", "default_workers"]

_MAX_DEFAULT_WORKERS = 4


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can skip the first batches of an epoch.

    Process ``r`` of ``W`` takes positions ``r, r + W, ...`` of the epoch's permutation, so one
    process with batch ``W * b`` sees, step for step, the union of what ``W`` processes with
    batch ``b`` see. Without shuffling and ``drop_last`` (evaluation) nothing is padded:
    every sample is seen exactly once over all processes.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample (of this process)."""
        super().set_epoch(epoch)
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle or self.drop_last:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        n = self.num_samples if self.shuffle or self.drop_last else len(range(self.rank, len(self.dataset), self.num_replicas))
        return n - self.start


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader workers per training process: up to 4, never more than this process's share of
    the cores (``LOCAL_WORLD_SIZE`` processes per machine under ``torchrun``), at least 1."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(_MAX_DEFAULT_WORKERS, available_cores() // local_processes))


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process alone reports it
    # and stops the loader; SIGTERM (sent by the loader to stop a stuck worker) ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class CountingLoader(DataLoader):
    """A ``DataLoader`` of ``(inputs, targets, skipped)`` batches that passes every batch's
    ``skipped`` to its :class:`~mlla.data.failures.FailureLog` (``failures``) in the main
    process: each failed file is logged once, and a pass with too many failures (over all
    processes) raises :class:`~mlla.data.failures.TooManyFailedSamples`.

    The limit is checked after every batch when the loader drops the last partial batch
    (training: every process has the same number of batches, so the check's all-reduce lines
    up), else once at the end of the pass (evaluation, where the processes' shares may differ
    by a batch; a pass must then be iterated to its end on every process).
    """

    def __init__(self, dataset: Dataset, *args: Any, failures: FailureLog, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.failures = failures

    def _pass_samples(self) -> int:
        """Samples this process takes in a whole pass (also when it starts mid-pass)."""
        samples = len(self.sampler) + getattr(self.sampler, "start", 0)
        if self.drop_last and self.batch_size:
            samples -= samples % self.batch_size
        return samples

    def __iter__(self) -> Iterator[Any]:
        self.failures.start_pass(self._pass_samples())
        for batch in super().__iter__():
            if isinstance(batch, (tuple, list)) and len(batch) == 3:
                self.failures.record(batch[2])
            if self.drop_last:
                self.failures.check()
            yield batch
        if not self.drop_last:
            self.failures.check()


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    is_training: bool,
    workers: int | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    max_failed_fraction: float | None = 0.01,
    collate_fn: Callable[[list[Any]], Any] = collate_skipping,
) -> CountingLoader:
    """A loader of ``collate_fn``'s batches (by default ``(images, targets, skipped)``); training
    drops the last partial batch.

    The loader's own generator seeds the workers, so building an iterator does not draw from
    the global random state (which a resumed run restores from its checkpoint). ``workers``
    None: :func:`default_workers`. More than ``max_failed_fraction`` failed samples in one pass
    stop it (see :class:`CountingLoader`).
    """
    sampler = ResumableSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=is_training, seed=seed, drop_last=is_training
    )
    workers = default_workers() if workers is None else workers
    return CountingLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=is_training,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None,
        failures=FailureLog(max_failed_fraction, "training" if is_training else "validation"),
    )
