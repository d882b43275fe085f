"""A content-addressed, atomic, float16 feature cache: a rerun extracts nothing."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def read_cached(path: Path, load):
    """Returns ``load(path)`` when ``path`` holds a readable entry, else None (cache entries are never None).

    An entry that does not load (torn, stale, foreign: ``load`` raises) is deleted and never trusted again.
    """
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception:  # unreadable or stale: the caller recomputes it
        path.unlink(missing_ok=True)
        return None


def write_cached(path: Path, save, value) -> None:
    """Stores ``value`` at ``path`` with ``save(file, value)``, atomically: a crash leaves only a ``.tmp`` file."""
    atomic_write(path, lambda f: save(f, value))


@contextmanager
def entry_lock(path: Path):
    """Holds an exclusive lock on the cache entry ``path`` across processes (a file named by the entry's path hash
    under the temporary directory, so the cache holds entries only), so that two chapters running at once compute
    a shared entry (one inverter, say) once: the second waits, then reads. Where the platform has no ``fcntl``
    (Windows) it locks nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    locks = Path(tempfile.gettempdir()) / f"featmap-locks-{os.getuid()}"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
    with open(locks / f"{name}.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(path: Path, load, compute, save, lock: bool = False):
    """Returns ``load(path)`` when ``path`` holds a readable entry, else ``compute()``, saved atomically with
    ``save(file, value)`` before it is returned.

    ``lock``: on a miss, hold ``entry_lock(path)`` while computing (and look again once it is held), so processes
    that need the same costly entry at once compute it once. Not for entries whose computing waits on other
    processes (a data-parallel training every rank joins).

    The one try-load / discard / recompute / atomic-write helper of every cache. Its two halves, ``read_cached``
    and ``write_cached``, serve the caches whose computing happens elsewhere: features extracted in batches for
    many entries at once, a map trained by every rank of a data-parallel run while rank 0 alone reads and writes.
    """
    value = read_cached(path, load)
    if value is not None:
        return value
    with entry_lock(path) if lock else nullcontext():
        value = read_cached(path, load)  # another process may have written it while this one waited
        if value is None:
            value = compute()
            write_cached(path, save, value)
    return value
