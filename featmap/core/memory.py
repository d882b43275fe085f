"""The process's allocator: keep freed memory for the next tensor instead of handing it back to the kernel.

glibc's defaults serve every allocation above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap`` and give
it back on ``free``; the next tensor of that size faults every page in again, zero-filled by the kernel. The
chapters allocate and free arrays of tens to hundreds of MiB in loops (statistics per cell, batches of feature
maps), so the kernel's time was a large share of a run: the layers chapter, cold, on one thread, spent 110 s in
the kernel of 278 s wall with glibc's defaults, and 8 s of 171 s with the settings below (the two runs side by side,
one per core, under /usr/bin/time; its peak resident memory rose from 2.02 to 2.64 GB).

Importing featmap changes nothing: the entry points apply the settings. ``python -m featmap prepare`` calls
``keep_freed_memory`` for its own process; ``make book``'s runner (``featmap.run.book``) starts every chapter's
papermill process, and so its kernel, with ``allocator_env()``, which glibc reads when a process starts.
``FEATMAP_MALLOC=default`` leaves glibc's settings alone; other C libraries (macOS, musl) are left alone.
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
# The same parameters as glibc reads them from the environment at a process's start.
ENV_NAMES = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
             M_TOP_PAD: "MALLOC_TOP_PAD_"}


def _applies() -> bool:
    """Returns whether featmap's settings apply here: ``FEATMAP_MALLOC`` is ``keep`` (its default) and the C
    library is glibc."""
    mode = os.environ.get(MALLOC_ENV, "keep")
    if mode not in ("keep", "default"):
        raise ValueError(f"{MALLOC_ENV} must be 'keep' (featmap's allocator settings) or 'default' (glibc's), "
                         f"got {mode!r}")
    return mode == "keep" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Returns whether ``SETTINGS`` were set in this process with glibc's ``mallopt`` (False: not glibc, or
    ``FEATMAP_MALLOC=default``). Setting them again is harmless."""
    if not _applies():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())


def allocator_env() -> dict[str, str]:
    """Returns the environment variables that give a child process ``SETTINGS`` from its start (empty where they do
    not apply: not glibc, or ``FEATMAP_MALLOC=default``)."""
    if not _applies():
        return {}
    return {ENV_NAMES[param]: str(value) for param, value in SETTINGS.items()}
