"""Progress bars that reach the person waiting, never a rendered page.

In a terminal, progress goes to stderr. Inside a notebook kernel (papermill, the book) it goes to the file named by
``$FEATMAP_PROGRESS`` when set (``make book`` sets it and streams the file to the terminal), else nowhere: a
chapter's page shows results, not progress bars.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from tqdm import tqdm

PROGRESS_ENV = "FEATMAP_PROGRESS"

def _in_kernel() -> bool:
    """Returns whether this process is a notebook kernel (its stderr lands in the notebook)."""
    return "ipykernel" in sys.modules


_OPEN: dict[str, io.TextIOBase] = {}  # one line-buffered handle per progress file, reused by every bar


def stream():
    """Returns where progress goes now: the ``$FEATMAP_PROGRESS`` file, stderr outside a kernel, or None."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        if path not in _OPEN or _OPEN[path].closed:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _OPEN[path] = open(path, "a", buffering=1, encoding="utf-8")
        return _OPEN[path]
    return None if _in_kernel() else sys.stderr


def bar(total: int, desc: str, unit: str, initial: int = 0, disable: bool = False, **kwargs) -> tqdm:
    """Returns a tqdm bar writing to ``stream()`` (disabled where progress has nowhere to go)."""
    out = None if disable else stream()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out or io.StringIO(),
                disable=out is None, mininterval=2.0 if out is not sys.stderr else 0.5, dynamic_ncols=False,
                ncols=100, **kwargs)
