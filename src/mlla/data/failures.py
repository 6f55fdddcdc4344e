"""Samples that fail (unreadable file, or an exception in the transform): the record a dataset
hands on, and the log that counts them, reports each once and stops a run that has too many.

A dataset never logs: its ``__getitem__`` may run in a loader worker process, where messages
would repeat once per worker and epoch. It returns the failures with the sample
(:class:`Skipped`), the batches carry them to the main process, and :class:`FailureLog` there
logs each file once, counts, and raises :class:`TooManyFailedSamples` above the allowed fraction.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

__all__ = ["FailureLog", "SampleFailure", "Skipped", "TooManyFailedSamples", "describe_error"]

_logger = logging.getLogger(__name__)


def describe_error(error: BaseException, path: str = "") -> str:
    """``'ValueError: message'`` on one line, the file name replaced by ``<file>`` (so that the
    same failure on many files reads the same)."""
    message = str(error).splitlines()[0] if str(error) else ""
    if path:
        message = message.replace(path, "<file>")
    return f"{type(error).__name__}: {message}"[:300]


@dataclass(frozen=True)
class SampleFailure:
    """One sample that could not be produced: dataset ``index``, file ``path``, ``stage``
    (``'load'`` or ``'transform'``) and the ``error`` (:func:`describe_error`)."""

    index: int
    path: str
    stage: str
    error: str

    @property
    def kind(self) -> str:
        """What went wrong, without the file: failures of one kind share it."""
        return f"{self.stage}: {self.error}"


class Skipped(int):
    """The number of failed samples behind a sample or a batch (an ``int``), carrying the
    :class:`SampleFailure` records in ``failures``."""

    failures: tuple[SampleFailure, ...]

    def __new__(cls, failures: Iterable[SampleFailure] = ()) -> "Skipped":
        failures = tuple(failures)
        self = super().__new__(cls, len(failures))
        self.failures = failures
        return self

    def __reduce__(self):  # picklable through loader worker queues
        return Skipped, (self.failures,)

    def __add__(self, other: object) -> "Skipped | int":
        if isinstance(other, Skipped):
            return Skipped(self.failures + other.failures)
        return int(self) + other  # type: ignore[operator]

    __radd__ = __add__


class TooManyFailedSamples(RuntimeError):
    """More samples failed than ``--max-failed-fraction`` allows."""


class FailureLog:
    """Counts the failures of one process and logs each file once.

    Args:
        max_fraction: stop (raise :class:`TooManyFailedSamples`) as soon as the failures of a
            pass over the data exceed this fraction of the pass's samples; ``None`` never stops.
        name: what the data is (``'training'``, ``'validation'``), for the messages.
    """

    def __init__(self, max_fraction: float | None = 0.01, name: str = "training") -> None:
        self.max_fraction = max_fraction
        self.name = name
        self.kinds: Counter[str] = Counter()  # over the whole run
        self.example: dict[str, str] = {}  # kind -> a file that failed so
        self.total = 0
        self.in_pass = 0
        self.pass_samples = 0
        self._logged: set[tuple[str, str]] = set()

    def start_pass(self, samples: int) -> None:
        """A new pass (epoch) over ``samples`` samples of this process begins."""
        self.in_pass, self.pass_samples = 0, samples

    def record(self, skipped: int) -> None:
        """Count the failures behind a batch's ``skipped`` (a :class:`Skipped` or a plain int),
        log new ones, and raise if the pass has too many."""
        failures = getattr(skipped, "failures", ())
        n = int(skipped)
        for f in failures:
            self.kinds[f.kind] += 1
            self.example.setdefault(f.kind, f.path)
            if (f.path, f.kind) not in self._logged:
                self._logged.add((f.path, f.kind))
                _logger.warning("skipping %s sample %s (%s)", self.name, f.path, f.kind)
        self.total += n
        self.in_pass += n
        if self.max_fraction is not None and n and self.in_pass > self.max_fraction * max(self.pass_samples, 1):
            raise TooManyFailedSamples(self.message())

    def commonest(self) -> tuple[str, int, str] | None:
        """``(kind, count, example file)`` of the commonest failure so far."""
        if not self.kinds:
            return None
        kind, count = self.kinds.most_common(1)[0]
        return kind, count, self.example[kind]

    def message(self) -> str:
        share = 100 * self.in_pass / max(self.pass_samples, 1)
        text = (
            f"{self.in_pass} of the {self.pass_samples} {self.name} samples of this pass failed ({share:.1f}%), "
            f"more than --max-failed-fraction {self.max_fraction} allows"
        )
        common = self.commonest()
        if common:
            kind, count, example = common
            text += f"; the commonest failure ({count} times) is {kind}, e.g. {example}"
        return text + ". Fix or remove those files (or the transform), or raise --max-failed-fraction"
