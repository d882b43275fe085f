"""Photo folders as users lay them out: linked class folders and files, loops, tiny photos, photos over PIL's
decompression-bomb guard."""
from __future__ import annotations

import os
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featmap.data.images as images_module
from featmap.data.images import (
    MAX_PIXELS_ENV,
    ImageLoadError,
    ImageSet,
    SmallPhotoWarning,
    View,
    load_rgb,
    square_view,
)


def _photo(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


@pytest.fixture
def linked(tmp_path):
    """``photos/cat`` is a folder of 2 photos; ``photos/dog`` a link to a folder of 3 elsewhere; ``photos/cow.png``
    a link to a photo elsewhere."""
    root = tmp_path / "photos"
    for i in range(2):
        _photo(root / "cat" / f"c{i}.png", i)
    for i in range(3):
        _photo(tmp_path / "elsewhere" / "dogs" / f"d{i}.png", 10 + i)
    os.symlink(tmp_path / "elsewhere" / "dogs", root / "dog")
    os.symlink(_photo(tmp_path / "elsewhere" / "cow.png", 20), root / "cow.png")
    return root


def test_linked_class_folders_and_files_are_followed(linked):
    photos = ImageSet.from_folder(linked).photos
    assert sorted(p.label for p in photos) == ["cat", "cat", "cow", "dog", "dog", "dog"]  # Path.rglob gave 2 cats
    assert {p.id for p in photos if p.label == "dog"} == {f"user/dog/d{i}.png" for i in range(3)}


def test_a_linked_folder_that_leads_back_is_named_not_followed_forever(linked):
    os.symlink(linked, linked / "cat" / "again")
    with pytest.raises(ValueError, match=rf"{linked / 'cat' / 'again'} links to {linked}, a folder it sits in"):
        ImageSet.from_folder(linked)


def test_a_link_to_nothing_is_an_unreadable_file(linked, tmp_path):
    os.symlink(tmp_path / "gone.png", linked / "cat" / "lost.png")
    with pytest.raises(ImageLoadError, match=rf"lost.png is a link to {tmp_path / 'gone.png'}, which does not exist"):
        ImageSet.from_folder(linked)
    images = ImageSet.from_folder(linked, skip_bad=True)
    assert len(images) == 6 and [s.split(":")[0] for s in images.skipped] == ["cat/lost.png"]


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(images_module, "_SMALL_SEEN", set())
    monkeypatch.setattr(images_module, "_VIEWS", images_module.ArrayMemo())


def _view(folder: Path, name: str) -> View:
    return View(next(p for p in ImageSet.from_folder(folder).photos if p.path.name == name))


def test_a_photo_much_smaller_than_the_input_is_named_in_a_warning(tmp_path, fresh_notices):
    _photo(tmp_path / "p" / "tiny.png", 0, (40, 30))  # short side 30 < 224 / 4
    _photo(tmp_path / "p" / "small.png", 1, (80, 60))  # 60 >= 56: upscaled, not warned
    _photo(tmp_path / "p" / "dot.png", 2, (1, 1))
    with pytest.warns(SmallPhotoWarning) as caught:
        for name in ("tiny.png", "small.png", "dot.png", "tiny.png"):
            ImageSet.view(_view(tmp_path / "p", name), 224)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # once per photo and input size
    assert "tiny.png is 40 x 30 px, under a quarter of the network's 224 px input" in messages[0]
    assert "dot.png is 1 x 1 px" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageSet.view(_view(tmp_path / "p", "small.png"), 224)
        ImageSet.view(View(_view(tmp_path / "p", "tiny.png").photo, 1), 100)  # 30 >= 25: fine at 100 px


def test_in_a_book_chapter_the_notice_goes_to_the_terminal_feed_not_the_page(tmp_path, fresh_notices, monkeypatch):
    """A chapter's stderr is its page; ``make book`` streams the progress file to the terminal."""
    from featmap.core.progress import PROGRESS_ENV

    _photo(tmp_path / "p" / "tiny.png", 0, (40, 30))
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or type(sys)("ipykernel"))
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "progress.log"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning reaches the page
        ImageSet.view(_view(tmp_path / "p", "tiny.png"), 224)
    assert "warning: photo" in (tmp_path / "progress.log").read_text()


def test_photos_over_pils_guard_are_read_up_to_the_stated_bound(tmp_path, monkeypatch):
    path = _photo(tmp_path / "wide.png", 3)  # 64 x 48 = 3,072 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard, planted below this photo
    assert load_rgb(path).shape == (48, 64, 3)  # PIL alone refuses it as a decompression bomb
    assert Image.MAX_IMAGE_PIXELS == 1000  # and its guard is left as it was
    view = square_view(load_rgb(path), 32, random_crop=(1, 90, True))  # PIL's crop would refuse the large box
    assert view.shape == (32, 32, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3000")
    with pytest.raises(ImageLoadError, match=rf"{path} has 64 x 48 = 3,072 pixels, over the 3,000 .*"
                                             rf"{MAX_PIXELS_ENV}=3072"):
        load_rgb(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3072")
    assert load_rgb(path).shape == (48, 64, 3)


def test_a_header_claiming_more_than_the_bound_is_refused_before_decoding(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "panorama.png"  # 30,000 x 10,000: 300 megapixels, over the 250 the default bound reads
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 10_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(ImageLoadError, match=rf"{path} has 30000 x 10000 = 300,000,000 pixels, over the "
                                             rf"250,000,000 featmap reads.*{MAX_PIXELS_ENV}=300000000"):
        load_rgb(path)


def test_the_book_runner_shows_every_warning_line_of_a_chapters_feed(tmp_path, capsys):
    """The runner prints a chapter's newest progress line every few seconds; a warning written before it must still
    reach the terminal, not be overwritten by the progress that followed."""
    from featmap.run.book import _Follow

    feed = tmp_path / "progress.log"
    feed.write_text("extracting:  10%|#\rwarning: photo tiny.png is 40 x 30 px\nextracting:  50%|#####\r"
                    "extracting:  90%|#########\r")
    _Follow(feed, "geometric")._show(0, "")
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["  [geometric] warning: photo tiny.png is 40 x 30 px", "  [geometric] extracting:  90%|#########"]
