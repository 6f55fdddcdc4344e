"""Data loaders whose sample order is a function of ``(seed, epoch)`` and that can start
mid-epoch (for resuming), on one process or many."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .dataset import collate_skipping

__all__ = ["ResumableSampler", "build_loader"]


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


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    is_training: bool,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] = collate_skipping,
) -> DataLoader:
    """A loader of ``collate_fn``'s batches (by default ``(images, targets, n_skipped)``); training
    drops the last partial batch.

    The loader's own generator seeds the workers, so building an iterator does not draw from
    the global random state (which a resumed run restores from its checkpoint).
    """
    sampler = ResumableSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=is_training, seed=seed, drop_last=is_training
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=is_training,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
