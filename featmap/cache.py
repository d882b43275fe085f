"""A content-addressed, atomic, float16 feature cache: a rerun extracts nothing."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "FEATMAP_CACHE"


def default_cache_dir() -> Path:
    """Returns $FEATMAP_CACHE if set, else ``.cache/featmap`` at the repository root."""
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "featmap")


def content_key(identity: dict) -> str:
    """Returns the sha256 of ``identity`` serialised canonically (sorted keys, no whitespace)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it onto ``path``.

    A crash mid-write leaves only a ``.tmp`` file, which no reader looks at.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Float16 arrays on disk under their content key; unreadable or misshapen entries are misses."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.hits = self.misses = self.writes = self.rejected = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Returns the stored float16 array, or None when absent, unreadable or not of ``shape``."""
        path = self.path(key)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (ValueError, OSError, EOFError):
            arr = None
        if arr is None or arr.dtype != np.float16 or (shape is not None and arr.shape != tuple(shape)):
            self.rejected += 1
            self.misses += 1
            path.unlink(missing_ok=True)  # never trust it again; it is recomputed
            return None
        self.hits += 1
        return arr

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, array: np.ndarray) -> None:
        """Stores ``array`` as float16 under ``key``, atomically."""
        array = np.asarray(array)
        if not np.isfinite(array).all() or np.abs(array).max(initial=0) > np.finfo(np.float16).max:
            raise ValueError(f"refusing to cache features under {key}: non-finite or beyond the float16 range")
        arr = np.ascontiguousarray(array, dtype=np.float16)
        atomic_write(self.path(key), lambda f: np.save(f, arr, allow_pickle=False))
        self.writes += 1
