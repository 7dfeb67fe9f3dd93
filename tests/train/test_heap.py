"""``release_free_heap``: the pages of freed heap blocks go back to the system (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mita.train.heap import _malloc_trim

# Run in a fresh interpreter: what earlier tests left in the heap (and their threads' arenas) would
# decide where these blocks go. Freeing a mapped 8 MiB block raises glibc's mmap threshold, so the 2 MiB
# blocks then come from the heap, each followed by a small block still in use: freeing them leaves holes
# the heap keeps (the state a training step leaves), which only malloc_trim returns.
_SCENARIO = """
import os, torch
from mita.train.heap import release_free_heap
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
mib = 2**20
torch.ones(8 * mib // 4)
blocks, pins = [], []
for _ in range(48):
    blocks.append(torch.ones(2 * mib // 4))
    pins.append(torch.ones(16 * 1024))
before = rss()
del blocks
kept = rss()
released = release_free_heap()
print(before - kept, kept - rss(), released)
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_pages_are_returned():
    res = subprocess.run([sys.executable, "-c", _SCENARIO], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    by_free, by_trim, released = res.stdout.split()
    mib = 2**20
    assert int(by_free) < 8 * mib, "the scenario did not leave the freed blocks in the heap"
    assert released == "True"
    assert int(by_trim) >= 48 * mib, "release_free_heap returned less than half of the freed 96 MiB"
