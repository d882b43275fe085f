"""Entry locks: one holder at a time across threads and processes, a lock file only while in use."""
from __future__ import annotations

import threading
import time

import pytest

import featmap.core.io as fio
from featmap.core.io import cached, entry_lock


@pytest.fixture
def locks(tmp_path, monkeypatch):
    folder = tmp_path / "locks"
    monkeypatch.setattr(fio, "lock_dir", lambda: folder)
    return folder


def test_a_released_lock_leaves_no_file(tmp_path, locks):
    for i in range(20):
        with entry_lock(tmp_path / f"entry{i}.pt") as held:
            assert held and len(list(locks.iterdir())) == 1  # the lock file exists while held ...
    assert list(locks.iterdir()) == []  # ... and not after
    value = cached(tmp_path / "x.txt", lambda p: p.read_text(), lambda: "v", lambda f, v: f.write(v.encode()),
                   lock=True)
    assert value == "v" and list(locks.iterdir()) == []


def test_one_holder_at_a_time_while_lock_files_come_and_go(tmp_path, locks):
    """Eight threads take one lock 400 times between them; each release unlinks the lock file, so waiters hold
    inodes no longer named. Were a lock on such an inode counted, two threads would be inside at once."""
    inside, most, entries = [0], [0], []
    guard = threading.Lock()

    def work(k):
        for i in range(50):
            with entry_lock(tmp_path / "shared.pt"):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                entries.append(k)
                time.sleep(0.0002 * (i % 3))
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entries) == 400 and most[0] == 1
    assert list(locks.iterdir()) == []


def test_a_lock_held_elsewhere_is_reported_without_waiting(tmp_path, locks):
    held, release = threading.Event(), threading.Event()

    def holder():
        with entry_lock(tmp_path / "e.pt"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    t0 = time.perf_counter()
    with entry_lock(tmp_path / "e.pt", wait=False) as got:
        assert got is False and time.perf_counter() - t0 < 1
    with entry_lock(tmp_path / "other.pt", wait=False) as got:
        assert got is True
    release.set()
    t.join()
    with entry_lock(tmp_path / "e.pt", wait=False) as got:
        assert got is True
    assert list(locks.iterdir()) == []
