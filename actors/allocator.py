"""The C allocator around a stage's load: what loading frees goes back to the system.

glibc serves a large block from the heap once its mmap threshold has grown (it grows to the
size of any mapped block that is freed, up to 32 MiB), and a heap keeps what is freed in its
middle. Loading a shard allocates and frees transient copies of its tensors, and which of them
land on the heap depends on the order of the frees: on the bench's memory shard, a stage's peak
was 46 MiB higher in some runs than in others, and then passed the stated bound (bench/RESULTS.md).

While a shard loads, every block of 128 KiB or more is mapped, and unmapped when freed. After
it, both thresholds are the largest glibc's own growth reaches, so the forward keeps reusing its
blocks: mapping every block would double its time in page faults. Without glibc, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
LOADING = 128 * 1024  # glibc's initial mmap threshold
RUNNING = 32 * 2**20  # the largest glibc's dynamic mmap threshold grows to on 64-bit systems


def _mallopt():
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def transients_returned():
    """Blocks allocated inside go back to the system when freed (see the module docstring)."""
    mallopt = _mallopt()
    if mallopt:
        mallopt(M_MMAP_THRESHOLD, LOADING)
    try:
        yield
    finally:
        if mallopt:
            mallopt(M_MMAP_THRESHOLD, RUNNING)
            mallopt(M_TRIM_THRESHOLD, 2 * RUNNING)  # as glibc sets it when the threshold grows
