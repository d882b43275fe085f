"""The one write helper (atomic; a full disk is one clear error), content keys, the cache helper and entry locks."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
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


# A failed write on a filesystem with less than this left is taken for a full disk even when the error does not say
# so: torch.save reports a short write as "unexpected pos" (the ENOSPC sits in its context, where a C++ caller may
# drop it), and a nearly full disk is what makes writes come up short.
LOW_SPACE_BYTES = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that found no space left; the message names the folder, the space left there and what was needed."""

    def __init__(self, path: Path, free: int | None, written: int, cause: BaseException):
        self.path, self.folder, self.free, self.written = path, path.parent, free, written
        left = "unknown space" if free is None else _size(free)
        super().__init__(errno.ENOSPC, (
            f"no space left to write {path.name} in {path.parent}: {left} free on its filesystem, and the write "
            f"failed after {_size(written)} ({type(cause).__name__}: {cause}); free some space there, or point the "
            f"cache (${CACHE_ENV} or the cache_dir parameter) or the results ($FEATMAP_RESULTS) at a disk with room, "
            "and run again: nothing was half-written"))

    def __str__(self) -> str:
        return self.strerror


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n} bytes"


def _free_bytes(folder: Path) -> int | None:
    """Returns the bytes free on ``folder``'s filesystem (None where it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _out_of_space(error: BaseException, free: int | None) -> bool:
    """Returns whether ``error``, raised while writing, comes from a full disk or quota."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:  # torch.save's RuntimeError keeps the OSError as context
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, (OSError, RuntimeError)) and free is not None and free < LOW_SPACE_BYTES


def _open_temporary(path: Path):
    """Returns (an open binary file, its name) for a new temporary file beside ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return os.fdopen(fd, "wb"), tmp


def atomic_write(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it onto ``path``.

    A crash mid-write leaves only a ``.tmp`` file, which no reader looks at; a failed write removes its temporary
    file. Every file featmap writes goes through here, so a full disk is one error for all of them: a
    ``DiskFullError`` (an ``OSError``, errno ENOSPC) naming the folder and the space left.
    """
    path = Path(path)
    tmp, written = None, 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f, tmp = _open_temporary(path)
        with f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            finally:
                written = os.fstat(f.fileno()).st_size
        os.replace(tmp, path)
    except BaseException as e:
        free = _free_bytes(path.parent if path.parent.is_dir() else _existing_parent(path))
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and _out_of_space(e, free):
            raise DiskFullError(path, free, written, e) from e
        raise


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return Path("/")


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


def lock_dir() -> Path:
    """Returns the folder of the entry locks: per user, under the temporary directory (the cache holds entries
    only)."""
    return Path(tempfile.gettempdir()) / f"featmap-locks-{os.getuid()}"


@contextmanager
def entry_lock(path: Path, wait: bool = True):
    """Holds an exclusive lock on the cache entry ``path`` across processes and threads, so that two chapters
    running at once compute a shared entry (one inverter, say) once: the second waits, then reads. Yields True once
    held; with ``wait=False`` it yields False at once where another holds it. Where the platform has no ``fcntl``
    (Windows) it locks nothing and yields True.

    The lock is a file under ``lock_dir()`` named by the hash of the entry's path, removed on release, so the
    folder holds only the locks in use (see ``_lock_file`` for why that is safe)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield True
        return
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = folder / f"{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()}.lock"
    f = _lock_file(name, wait)
    if f is None:
        yield False
        return
    try:
        yield True
    finally:
        name.unlink(missing_ok=True)  # while held: see _lock_file
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _lock_file(name: Path, wait: bool):
    """Returns the open lock file ``name``, flock-ed, or None when ``wait`` is False and another holds it.

    The holder unlinks the name before it unlocks, so a process that opened the name earlier may come to hold a
    lock on an inode no longer reachable by that name, while a newcomer creates and locks a fresh file under it:
    two holders of "one" lock. A lock therefore counts only when, once held, the name still points at the locked
    inode; otherwise the stale inode is let go and the name opened again. Only a holder unlinks, so while one holds
    a counted lock the name keeps pointing at its inode and every other process fails that check."""
    import fcntl

    while True:
        f = open(name, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        try:
            on_disk = os.stat(name)
        except FileNotFoundError:
            on_disk = None
        held = os.fstat(f.fileno())
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev):
            return f
        f.close()  # a stale inode: its holder released it after unlinking the name


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
