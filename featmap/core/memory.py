"""The process's allocator: keep freed memory for the next tensor instead of handing it back to the kernel.

glibc's defaults serve every allocation above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap`` and give
it back on ``free``; the next tensor of that size faults every page in again, zero-filled by the kernel. The
chapters allocate and free arrays of tens to hundreds of MiB in loops (statistics per cell, batches of feature
maps), so the kernel's time was a large share of a run: the layers chapter, cold, on one thread, spent 110 s in
the kernel of 278 s wall with glibc's defaults, and 8 s of 171 s with the settings below (the two runs side by side,
one per core, under /usr/bin/time; its peak resident memory rose from 2.02 to 2.64 GB).

``keep_freed_memory`` runs when featmap is imported. ``FEATMAP_MALLOC=default`` leaves glibc's settings alone;
other C libraries (macOS, musl) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MALLOC_ENV = "FEATMAP_MALLOC"
# mallopt's parameters (malloc.h) and the values set: allocations under 1 GiB come from the heap, freed memory is
# returned to the kernel only when 2 GiB lie free at the top of the heap, and the heap grows by 64 MiB extra at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 64 << 20}


def keep_freed_memory() -> bool:
    """Sets ``SETTINGS`` with glibc's ``mallopt``; returns whether they were set (False: not glibc, or
    ``FEATMAP_MALLOC=default``). Setting them again is harmless."""
    mode = os.environ.get(MALLOC_ENV, "keep")
    if mode not in ("keep", "default"):
        raise ValueError(f"{MALLOC_ENV} must be 'keep' (featmap's allocator settings) or 'default' (glibc's), "
                         f"got {mode!r}")
    if mode == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
