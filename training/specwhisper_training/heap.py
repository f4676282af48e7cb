"""Keep freed memory in the process while a draft trains on the CPU (glibc only).

PyTorch's CPU allocator asks malloc for every tensor and frees it when the step is done. glibc maps
any block above its mmap threshold (32 MB at most) afresh and returns it on free, so every training
step of the draft faulted in its large tensors (logits and softmaxes over the trimmed vocabulary,
tens of MB each) page by page, which cost the training most of its system time (docs/experiments.md).
"""

from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's initial values for them
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024


@contextmanager
def freed_memory_kept(mmap_threshold: int = 1 << 30) -> Iterator[bool]:
    """Within: blocks below ``mmap_threshold`` bytes come from the heap, which is never trimmed, so
    freed memory is reused without faulting it in again. On exit the thresholds go back to glibc's
    initial values (set explicitly, so glibc no longer raises them by itself) and the heap is trimmed:
    the memory goes back to the system, as a process that goes on serving expects. Yields whether
    glibc took the settings (False elsewhere)."""
    if platform.libc_ver()[0] != "glibc":
        yield False
        return
    libc = ctypes.CDLL(None)
    taken = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not taken:
        log.warning("glibc refused the malloc settings: training keeps faulting in its large tensors")
    try:
        yield taken
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
