"""Replacing a sample that cannot be used by the next usable one, the same way in every task's
dataset (ImageFolder, COCO, ADE20K): tried in order, at most :data:`MAX_CONSECUTIVE_BAD` in a
row, each failure handed back to be counted."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["MAX_CONSECUTIVE_BAD", "UnusableSample", "first_usable"]

T = TypeVar("T")

#: More unusable samples in a row than this stop the run: the data, not a few files, is wrong.
MAX_CONSECUTIVE_BAD = 64


class UnusableSample(Exception):
    """Raised by a dataset's sample function for a sample that cannot be used; ``record`` says why."""

    def __init__(self, record: Any = None) -> None:
        super().__init__(record)
        self.record = record


def first_usable(
    index: int, size: int, sample: Callable[[int], T], *, replace: bool, give_up: Callable[[list[Any]], str]
) -> tuple[T | None, list[Any]]:
    """``(sample(index), [])``, or where that raises :class:`UnusableSample`: with ``replace`` the
    first usable sample after it (wrapping around), without it ``None``; the second value lists
    the records of the samples that failed. Raises RuntimeError(``give_up(records)``) when
    :data:`MAX_CONSECUTIVE_BAD` (or all) samples in a row fail."""
    records: list[Any] = []
    for attempt in range(min(size, MAX_CONSECUTIVE_BAD)):
        try:
            return sample((index + attempt) % size), records
        except UnusableSample as e:
            records.append(e.record)
            if not replace:
                return None, records
    raise RuntimeError(give_up(records))
