"""mlla.runtime.retain_freed_memory: the allocator setting behind `mlla benchmark --allocator retain`."""
import logging
import subprocess
import sys

import pytest

from mlla import runtime

# Run in a child process: the setting is process-wide and cannot be undone.
_PROBE = r"""
import torch
from mlla.runtime import retain_freed_memory

def minor_faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

def faults_of_second_allocation():
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB: above glibc's mmap threshold
    before = minor_faults()
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return minor_faults() - before

default = faults_of_second_allocation()
applied = retain_freed_memory()
faults_of_second_allocation()  # the heap may first have to move past a mapping to grow
retained = faults_of_second_allocation()
print(applied, default, retained)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux only")
def test_retained_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    applied, default, retained = out[0] == "True", int(out[1]), int(out[2])
    assert applied
    # 64 MiB is 16384 pages of 4 KiB: by default freed and faulted in again; retained, the second
    # block reuses the first one's pages.
    if default < 1000:
        pytest.skip(f"only {default} page faults by default (huge pages?): nothing to compare")
    assert retained < default / 10, (default, retained)


def test_other_platforms_are_left_alone_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger="mlla.runtime"):
        assert runtime.retain_freed_memory() is False
    assert "needs glibc on Linux" in caplog.text
    assert runtime.trim_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux only")
def test_trim_freed_memory_calls_glibc():
    assert runtime.trim_freed_memory() is True
