"""Samples that fail (unreadable file, or an exception in the transform): the record a dataset
hands on, and the log that counts them, reports each once and stops a run that has too many.

A dataset never logs: its ``__getitem__`` may run in a loader worker process, where messages
would repeat once per worker and epoch. It returns the failures with the sample
(:class:`Skipped`), the batches carry them to the main process, and :class:`FailureLog` there
logs each file once, counts, and raises :class:`TooManyFailedSamples` above the allowed fraction.

Under ``torch.distributed`` the limit applies to the failures of all processes together: a check
(:meth:`FailureLog.check`) sums the pass's counts over the processes, so every process raises
at the same batch with the same message, and one process with batch ``W * b`` stops where ``W``
processes with batch ``b`` do.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

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
    """Counts the failures of one process, logs each file once, and checks the failures of a pass
    over the data (summed over all processes) against the allowed fraction.

    Args:
        max_fraction: stop (raise :class:`TooManyFailedSamples`) when the failures of a pass
            exceed this fraction of the pass's samples; ``None`` never stops.
        name: what the data is (``'training'``, ``'validation'``), for the messages.
    """

    def __init__(self, max_fraction: float | None = 0.01, name: str = "training") -> None:
        self.max_fraction = max_fraction
        self.name = name
        self.kinds: Counter[str] = Counter()  # over the whole run
        self.example: dict[str, str] = {}  # kind -> a file that failed so (the first by name)
        self.total = 0
        self.in_pass = 0
        self.pass_samples = 0
        self._logged: set[tuple[str, str]] = set()

    def start_pass(self, samples: int) -> None:
        """A new pass (epoch) over ``samples`` samples of this process begins."""
        self.in_pass, self.pass_samples = 0, samples

    def record(self, skipped: int) -> None:
        """Count the failures behind a batch's ``skipped`` (a :class:`Skipped` or a plain int)
        and log new ones (no check: see :meth:`check`)."""
        for f in getattr(skipped, "failures", ()):
            self.kinds[f.kind] += 1
            self.example[f.kind] = min(self.example.get(f.kind, f.path), f.path)
            if (f.path, f.kind) not in self._logged:
                self._logged.add((f.path, f.kind))
                _logger.warning("skipping %s sample %s (%s)", self.name, f.path, f.kind)
        self.total += int(skipped)
        self.in_pass += int(skipped)

    def check(self) -> None:
        """Raise :class:`TooManyFailedSamples` if the pass so far has more failures than allowed.

        Under ``torch.distributed`` this is a collective call (every process must make it at
        the same point): counts are summed over the processes and all raise the same error.
        """
        if self.max_fraction is None:
            return
        failed, samples = self.in_pass, self.pass_samples
        distributed = _distributed()
        if distributed:
            failed, samples = (int(v) for v in _sum_over_processes([failed, samples]))
        if failed <= self.max_fraction * max(samples, 1):
            return
        kinds, example = self.kinds, self.example
        if distributed:  # every process names the same commonest failure
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (dict(self.kinds), self.example))
            kinds, example = Counter(), {}
            for k, e in gathered:
                kinds.update(k)
                for kind, path in e.items():
                    example[kind] = min(example.get(kind, path), path)
        raise TooManyFailedSamples(self.message(failed, samples, kinds, example))

    def message(self, failed: int, samples: int, kinds: Counter[str], example: dict[str, str]) -> str:
        """The error for ``failed`` of ``samples`` (all processes), naming the commonest of ``kinds``."""
        share = 100 * failed / max(samples, 1)
        text = (
            f"{failed} of the {samples} {self.name} samples of this pass failed ({share:.1f}%), "
            f"more than --max-failed-fraction {self.max_fraction} allows"
        )
        common = _commonest(kinds, example)
        if common:
            kind, count, path = common
            text += f"; the commonest failure ({count} times) is {kind}, e.g. {path}"
        return text + ". Fix or remove those files (or the transform), or raise --max-failed-fraction"


def _commonest(kinds: Counter[str], example: dict[str, str]) -> tuple[str, int, str] | None:
    """``(kind, count, example file)`` of the commonest failure, or None."""
    if not kinds:
        return None
    kind, count = min(kinds.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: by name, the same everywhere
    return kind, count, example[kind]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_processes(values: list[int]) -> list[int]:
    """``values`` summed over the default process group (on the GPU for NCCL)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
