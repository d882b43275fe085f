"""A full disk is one clear error from the one write helper, never a half-written file nor a missing capability;
a rerun after space is freed gives the uninterrupted run's table, image metrics included."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import featmap.core.io as fio
from featmap.core.io import DiskFullError, atomic_write, write_cached

MB = 1 << 20


class _Disk:
    """A disk of ``free`` bytes that every write helper's temporary file draws from (the injected full disk)."""

    def __init__(self, free: int):
        self.free = free


class _LimitedFile(io.RawIOBase):
    """A temporary file on ``disk``: a write past its free bytes lands what fits, then fails with ENOSPC. Not an
    ``io.FileIO``, so numpy writes through ``write`` instead of straight to the descriptor."""

    def __init__(self, fd: int, disk: _Disk):
        self.raw, self.disk = io.FileIO(fd, "wb"), disk

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def fileno(self):
        return self.raw.fileno()

    def write(self, b):
        view = memoryview(b).cast("B")
        if len(view) > self.disk.free:
            self.raw.write(view[:self.disk.free])
            self.disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= len(view)
        return self.raw.write(view)

    def close(self):
        self.raw.close()
        super().close()


@pytest.fixture
def disk(monkeypatch):
    """A full disk injected into ``featmap.core.io``: writes past ``disk.free`` bytes fail with ENOSPC, as the kernel
    fails them, and the helper sees ``disk.free`` bytes free."""
    state = _Disk(0)

    def open_temporary(path):
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        return _LimitedFile(fd, state), tmp

    monkeypatch.setattr(fio, "_open_temporary", open_temporary)
    monkeypatch.setattr(fio, "_free_bytes", lambda folder: state.free)
    return state


# Every kind of file the package writes, by the serializer it writes with.
WRITERS = {
    "features (np.save)": lambda f: np.save(f, np.ones((64, 320, 7, 7), np.float16), allow_pickle=False),
    "maps and conversions (torch.save)": lambda f: torch.save({"w": torch.ones(300_000)}, f),
    "scores (np.savez)": lambda f: np.savez(f, __rows__=np.array(json.dumps([{"a": 1}])), x=np.ones(300_000)),
    "results (CSV bytes)": lambda f: f.write(("family,value\n" + "geometric,0.5\n" * 100_000).encode()),
}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", list(WRITERS))
def test_an_injected_full_disk_is_one_error_naming_the_folder_and_leaves_nothing(tmp_path, disk, kind):
    disk.free = 100_000  # every writer above writes more than this
    target = tmp_path / "cache" / "ab" / "entry.bin"
    with pytest.raises(DiskFullError) as err:
        atomic_write(target, WRITERS[kind])
    message = str(err.value)
    assert str(target.parent) in message and "free on its filesystem" in message and "FEATMAP_CACHE" in message
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError) and err.value.folder == target.parent
    assert _leftovers(tmp_path) == []  # no temporary file, no torn entry
    disk.free = 100 * MB  # space freed: the same write succeeds
    atomic_write(target, WRITERS[kind])
    assert _leftovers(tmp_path) == ["entry.bin"]


def test_torch_saves_short_write_is_recognised_from_its_context(tmp_path, disk):
    """torch.save turns the ENOSPC into RuntimeError("unexpected pos ..."), keeping the OSError as its context."""
    disk.free = 10_000
    with pytest.raises(DiskFullError) as err:
        write_cached(tmp_path / "lpips" / "alex.pt", lambda f, v: torch.save(v, f), {"w": torch.ones(100_000)})
    assert isinstance(err.value.__cause__, RuntimeError) and "unexpected pos" in str(err.value.__cause__)
    assert "unexpected pos" in str(err.value) and str(tmp_path / "lpips") in str(err.value)


def test_a_failure_with_room_left_is_not_called_a_full_disk(tmp_path):
    def broken(f):
        f.write(b"partial")
        raise RuntimeError("a serializer bug")

    with pytest.raises(RuntimeError, match="a serializer bug") as err:
        atomic_write(tmp_path / "x.bin", broken)
    assert not isinstance(err.value, DiskFullError) and _leftovers(tmp_path) == []


def test_a_short_write_on_a_nearly_full_disk_without_errno_is_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_free_bytes", lambda folder: 4096)

    def short(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1494")

    with pytest.raises(DiskFullError, match=r"4096 bytes free"):
        atomic_write(tmp_path / "x.pt", short)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB filesystem (tmpfs; needs root and permission to mount), else the test is skipped."""
    folder = tmp_path / f"small-{uuid.uuid4().hex[:8]}"
    if not _mount_tmpfs(folder, "4m"):
        pytest.skip("mounting a small tmpfs needs root and CAP_SYS_ADMIN; the injected full disk covers the rest")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_real_full_filesystem_is_one_error_naming_the_folder(small_disk, kind):
    (small_disk / "filler").write_bytes(b"\0" * (4 * MB - 64 * 1024))  # 64 KB left
    target = small_disk / "cache" / "entry.bin"
    with pytest.raises(DiskFullError) as err:
        atomic_write(target, WRITERS[kind])
    assert str(target.parent) in str(err.value) and err.value.free is not None and err.value.free < 128 * 1024
    assert _leftovers(small_disk) == ["filler"]
    (small_disk / "filler").unlink()
    atomic_write(target, WRITERS[kind])
    assert target.is_file()


# -- a chapter on a full disk, then rerun ------------------------------------------------------------------------

def _tiny_config(photo_dir: Path):
    from featmap.run.config import RunConfig

    return RunConfig(chapter="geometric", manipulations=["rotation_90"], layers=["blocks.6"], images=str(photo_dir),
                     image_size=128, mappings=["identity", "linear"], bootstrap=50, inverter_epochs=1, threads=1)


def _fresh_process_state():
    """Forgets what this process built (LPIPS models, feature arrays read): a run sees only its cache folder."""
    from featmap.score import images

    images._offline_lpips.cache_clear()


def _run(photo_dir: Path, root: Path, monkeypatch) -> pd.DataFrame:
    from featmap.run.chapter import run_chapter

    monkeypatch.setenv("FEATMAP_CACHE", str(root / "cache"))
    monkeypatch.setenv("FEATMAP_RESULTS", str(root / "results"))
    _fresh_process_state()
    run_chapter(_tiny_config(photo_dir))
    table = pd.read_csv(root / "results" / "geometric.csv")
    return table[table.metric != "fit_seconds"].reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, photo_dir):
    with pytest.MonkeyPatch.context() as mp:
        return _run(photo_dir, tmp_path_factory.mktemp("uninterrupted"), mp)


def test_a_chapter_on_a_full_disk_stops_naming_the_folder_and_its_rerun_gives_the_uninterrupted_table(
        tmp_path, photo_dir, disk, monkeypatch, uninterrupted, one_thread):
    """8 MB free: the features, the inverter and the scores fit, the LPIPS weights' conversion (9.9 MB) does not.
    That write failing was once taken for "LPIPS unavailable": the run went on, cached its scores without LPIPS and
    a rerun served them. It must stop, and the rerun after space is freed must give the uninterrupted table."""
    assert (uninterrupted.metric == "lpips").sum() > 0  # the table this test compares with has LPIPS rows
    disk.free = 8 * MB
    with pytest.raises(DiskFullError) as err:
        _run(photo_dir, tmp_path, monkeypatch)
    assert str(tmp_path / "cache" / "lpips") in str(err.value) and "free on its filesystem" in str(err.value)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "results").exists()
    disk.free = 1 << 40  # space freed
    again = _run(photo_dir, tmp_path, monkeypatch)
    pd.testing.assert_frame_equal(again, uninterrupted)


def test_scores_made_without_a_metric_are_not_served_to_a_run_that_has_it(tmp_path, photo_dir, monkeypatch,
                                                                           uninterrupted, one_thread):
    from featmap.score import lpips_offline

    with monkeypatch.context() as mp:  # the weights package genuinely missing: LPIPS is unavailable, and says why
        mp.setattr(lpips_offline, "available", lambda net="alex": (False, f"LPIPS {net} is unavailable: not installed"))
        without = _run(photo_dir, tmp_path, mp)
    assert "lpips" not in set(without.metric) and "st_lpips" in set(without.metric)
    again = _run(photo_dir, tmp_path, monkeypatch)  # the same cache, LPIPS installed again
    pd.testing.assert_frame_equal(again, uninterrupted)


def test_a_damaged_weights_file_is_an_error_naming_it_not_an_unavailable_metric(tmp_path, monkeypatch):
    from featmap.score import images, lpips_offline

    damaged = tmp_path / "alexnet.ckpt"
    damaged.write_bytes(b"\x80\x04 not a checkpoint")
    monkeypatch.setattr(lpips_offline, "weights_file", lambda net: damaged)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torchvision-checkpoint"))
    images._offline_lpips.cache_clear()
    assert images.lpips_available()[0]  # the package and its file are there: available ...
    photos = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=rf"LPIPS alex weights {damaged} cannot be read.*--force-reinstall"):
        images.lpips_distance(photos, photos)  # ... and using it fails naming the file, never drops the rows
    images._offline_lpips.cache_clear()
