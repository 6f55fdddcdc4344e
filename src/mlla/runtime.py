"""Process-wide settings for fast CPU inference.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above
32 MiB with ``mmap`` and hands it back to the operating system when it is freed, so each large
activation is page-faulted in afresh, at every call. At high resolution (a 2048 x 2048 backbone
allocates hundreds of such blocks per image) those page faults cost a large share of the
arithmetic, and more than linearly in pixels, because smaller blocks are recycled but larger
ones are not. :func:`retain_freed_memory` makes glibc keep freed memory in the heap for reuse,
the effect of preloading tcmalloc or jemalloc, which PyTorch's CPU launcher
(``python -m torch.backends.xeon.run_cpu``) recommends for the same reason.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["retain_freed_memory", "trim_freed_memory"]

_logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc_function(name: str):
    """``name`` from the C library if it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def retain_freed_memory(trim_threshold_bytes: int = 2**31 - 1) -> bool:
    """Keep memory freed by tensors in this process for reuse instead of returning it (glibc).

    Serves every allocation from the heap (no ``mmap``) and returns free heap memory to the
    system only above ``trim_threshold_bytes``. The resident memory then stays at the largest
    working set seen, which suits an inference server or a benchmark and not a process that
    must give memory back. It cannot be undone in the running process, and it affects every
    model in it alike.

    Returns:
        True if applied; False (nothing changed, with a logged warning) where the C library is
        not glibc, for example on macOS, Windows or musl.
    """
    if not sys.platform.startswith("linux"):
        _logger.warning("retain_freed_memory: needs glibc on Linux, this is %s; nothing changed", sys.platform)
        return False
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        _logger.warning("retain_freed_memory: the C library has no mallopt (not glibc); nothing changed")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, min(trim_threshold_bytes, 2**31 - 1))):
        _logger.warning("retain_freed_memory: mallopt refused the settings; the allocator may be partly changed")
        return False
    return True


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc ``malloc_trim``).

    Returns False, doing nothing, where the C library is not glibc.
    """
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
