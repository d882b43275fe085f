import shutil

import numpy as np
import pytest
from PIL import Image

from featmap.data.images import ImageLoadError, ImageSet, View, load_rgb, square_view


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb_uint8(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        np.linspace(0, 1, 17 * 23).reshape(17, 23).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        * (65535 if mode != "F" else 1))
    assert img.mode == mode
    suffix = ".tif" if mode in ("I;16", "I", "F", "CMYK") else ".png"
    out = load_rgb(save(img, tmp_path / f"x{suffix}"))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    out = load_rgb(save(Image.fromarray(ramp), tmp_path / "r.png"))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert np.array_equal(out[..., 0].ravel(), np.arange(256, dtype=np.uint8))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    out = load_rgb(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (out == 255).all()


def test_bad_files_name_themselves(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt"):
        load_rgb(tmp_path / "notes.txt")
    good = save(Image.new("RGB", (64, 64), "red"), tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_rgb(truncated)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        load_rgb(tmp_path / "empty.png")


def test_user_folders(tmp_path, photo_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageSet.from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        ImageSet.from_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    shutil.copytree(photo_dir, mixed)
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageLoadError, match="broken.jpg.*skip_bad_images"):
        ImageSet.from_folder(mixed)
    s = ImageSet.from_folder(mixed, skip_bad=True)
    assert len(s) == 8 and len(s.skipped) == 1 and "broken.jpg" in s.skipped[0]
    classes = tmp_path / "classes"
    for i, p in enumerate(sorted(photo_dir.iterdir())[:4]):
        (classes / ("cat" if i < 2 else "dog")).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, classes / ("cat" if i < 2 else "dog") / p.name)
    assert sorted(p.label for p in ImageSet.from_folder(classes).photos) == ["cat", "cat", "dog", "dog"]


def test_duplicate_photos_are_kept_once(tmp_path, photo_dir):
    shutil.copytree(photo_dir, tmp_path / "d")
    first = sorted((tmp_path / "d").iterdir())[0]
    shutil.copy(first, tmp_path / "d" / "copy_of_first.jpg")
    s = ImageSet.from_folder(tmp_path / "d")
    assert len(s) == 8 and s.duplicates == 1


def test_split_is_by_source_photo_seeded_and_never_leaks():
    images = ImageSet.default()
    a, b, c = images.split(seed=0), images.split(seed=0), images.split(seed=1)
    assert [p.id for p in a.test] == [p.id for p in b.test]
    assert [p.id for p in a.test] != [p.id for p in c.test]
    parts = [{p.sha256 for p in getattr(a, k)} for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == len(images)
    train_views = a.views("train", 3)
    assert {v.photo.id for v in train_views} == {p.id for p in a.train}
    assert all(v.index == 0 for v in a.views("test", 3))  # test photos get the evaluation crop only


def test_default_set_holds_the_vendored_and_bundled_photos():
    images = ImageSet.default()
    sources = {p.source for p in images.photos}
    assert sources == {"gcompris", "foolbox", "skimage", "sklearn", "matplotlib"}
    assert len(images) >= 230
    assert sum(p.source == "foolbox" for p in images.photos) == 20


def test_views_are_square_seeded_and_differ(photo_dir):
    photo = ImageSet.from_folder(photo_dir).photos[0]
    centre = ImageSet.view(View(photo, 0), 96, crop_pct=0.875)
    crop1 = ImageSet.view(View(photo, 1), 96, seed=0)
    assert centre.shape == crop1.shape == (96, 96, 3)
    assert np.array_equal(crop1, ImageSet.view(View(photo, 1), 96, seed=0))
    assert not np.array_equal(crop1, ImageSet.view(View(photo, 1), 96, seed=1))
    assert not np.array_equal(crop1, ImageSet.view(View(photo, 2), 96, seed=0))


def test_centre_view_of_any_aspect_ratio():
    wide = np.zeros((30, 300, 3), np.uint8)
    wide[:, 140:160] = 255
    out = square_view(wide, 32, "bilinear", 1.0)
    assert out.shape == (32, 32, 3) and out[:, 14:18].mean() > 200


def test_subset_and_bad_specs():
    assert len(ImageSet.from_spec("default", max_images=12, seed=0)) == 12
    with pytest.raises(TypeError, match="images must be"):
        ImageSet.from_spec(["a"])
    with pytest.raises(ValueError, match="test_fraction"):
        ImageSet.default().split(test_fraction=1.5)
