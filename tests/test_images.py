import shutil
from pathlib import Path

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


def test_a_view_is_decoded_once_per_process_and_handed_out_read_only(photo_dir, monkeypatch):
    import featmap.data.images as images

    monkeypatch.setattr(images, "_VIEWS", images.ArrayMemo())
    monkeypatch.setattr(images, "VIEW_MEMO_BYTES", 2 * 64 * 64 * 3)  # two 64 px views
    photos = ImageSet.from_folder(photo_dir).photos[:3]
    decoded = []
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda path: decoded.append(path) or real(path))
    first = ImageSet.view(View(photos[0], 1), 64, seed=3)
    with pytest.raises(ValueError, match="read-only"):
        first[:] = 0  # shared by every caller: nobody changes it
    again = ImageSet.view(View(photos[0], 1), 64, seed=3)
    assert len(decoded) == 1 and again is first
    assert np.array_equal(again, square_view(real(photos[0].path), 64, random_crop=(
        images.derive_seed(3, "view", photos[0].id, 1), 35, True)))
    ImageSet.view(View(photos[0], 1), 64, seed=4)  # another seed is another view
    ImageSet.view(View(photos[1], 0), 64)
    ImageSet.view(View(photos[2], 0), 64)  # three more views: the memo keeps the last two only
    ImageSet.view(View(photos[0], 1), 64, seed=3)
    assert len(decoded) == 5


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


# -- groups: near-duplicates and shots of one subject stay on one side ------------------------------------

def _texture(seed: int, h: int = 90, w: int = 120) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture
def planted(tmp_path):
    """Ten unrelated photos; a cropped, shrunk, JPEG-recompressed copy of one and a mirrored copy of another;
    and three photos of a GCompris-style manifest, two of them numbered shots of one subject."""
    from featmap.data.images import gcompris_photos

    folder = tmp_path / "user"
    folder.mkdir()
    for i in range(10):
        _texture(i).save(folder / f"p{i}.png")
    p0 = _texture(0)
    p0.crop((5, 4, 116, 87)).resize((80, 60), Image.Resampling.BILINEAR).save(folder / "p0_copy.jpg", quality=70)
    _texture(1).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "p1_mirror.png")
    root = tmp_path / "gcompris"
    (root / "renewable").mkdir(parents=True)
    rows = ["file,label,category,source,author,licence,sha256"]
    shots = [("windmill9", 20, "File:Windmill_Linda_1.jpg"), ("windmill14", 21, "File:Windmill_Linda_2.jpg"),
             ("windmill15", 22, "File:Windmill_Altenbeichlingen_1.JPG")]
    for name, seed, source in shots:
        _texture(seed).save(root / "renewable" / f"{name}.png")
        rows.append(f"renewable/{name}.png,windmill,renewable,https://commons.wikimedia.org/wiki/{source},"
                    f"Aschroet,CC0,{name}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return ImageSet(ImageSet.from_folder(folder).photos + gcompris_photos(root))


PLANTED_PAIRS = {("user/p0.png", "user/p0_copy.jpg"), ("user/p1.png", "user/p1_mirror.png"),
                 ("gcompris/renewable/windmill14.png", "gcompris/renewable/windmill9.png")}


def test_near_duplicates_and_numbered_shots_are_grouped_unrelated_photos_are_not(planted):
    merged = {g.ids: g.reasons for g in planted.groups if len(g.ids) > 1}
    assert set(merged) == PLANTED_PAIRS
    assert "near-duplicate" in merged["user/p0.png", "user/p0_copy.jpg"][0]
    assert "same subject 'aschroet/windmill_linda'" in merged["gcompris/renewable/windmill14.png",
                                                            "gcompris/renewable/windmill9.png"][0]
    assert len(planted.groups) == len(planted) - 3
    card = {row["id"]: row for row in planted.describe()}
    assert card["user/p0_copy.jpg"]["group"] == "user/p0.png" and "near-duplicate" in card["user/p0_copy.jpg"][
        "grouped_by"]
    assert card["user/p5.png"]["group"] == "user/p5.png" and card["user/p5.png"]["grouped_by"] == ""


def test_a_group_never_straddles_the_split_and_the_split_is_seeded(planted):
    side_of = lambda split: {p.id: k for k in ("train", "val", "test") for p in getattr(split, k)}  # noqa: E731
    tests = set()
    for seed in range(60):
        split = planted.split(0.25, 0.25, seed)
        side = side_of(split)
        assert sorted(side) == sorted(p.id for p in planted.photos)  # every photo once
        assert all(split.train) and split.val and split.test
        for pair in PLANTED_PAIRS:
            assert side[pair[0]] == side[pair[1]], (seed, pair)
        tests.add(tuple(p.id for p in split.test))
        assert side_of(planted.split(0.25, 0.25, seed)) == side
    assert len(tests) > 30  # the seed moves the groups about


def test_without_merges_the_split_is_the_plain_split_by_photo(photo_dir):
    from featmap.core.seeding import rng_for

    images = ImageSet.from_folder(photo_dir)
    assert all(len(g.ids) == 1 for g in images.groups)
    for seed in range(5):
        order = rng_for(seed, "split").permutation(len(images))
        split = images.split(0.25, 0.25, seed)
        assert [p.id for p in split.test] == sorted(images.photos[i].id for i in order[:2])
        assert [p.id for p in split.val] == sorted(images.photos[i].id for i in order[2:4])


def test_every_part_gets_a_group_when_groups_are_large():
    from featmap.data.images import Photo

    photos = [Photo(id=f"x/{size}_{k}", path=Path(f"/nowhere/{size}_{k}.png"), source="x", label="x", licence="-",
                    sha256=f"{size}_{k}", subject=f"s{size}") for size in (2, 3, 6) for k in range(size)]
    images = ImageSet(photos)
    images.near_duplicate_bits = None  # subjects only (these files do not exist)
    assert sorted(len(g.ids) for g in images.groups) == [2, 3, 6]
    for seed in range(20):
        split = images.split(0.1, 0.45, seed)
        assert split.train and split.val and split.test
        assert sorted(p.id for k in ("train", "val", "test") for p in getattr(split, k)) == sorted(p.id for p in photos)
        assert {len({p.subject for p in getattr(split, k)}) for k in ("train", "val", "test")} == {1}


def test_too_few_groups_is_a_clear_error(tmp_path):
    for i in range(2):
        _texture(i).save(tmp_path / f"a{i}.png")
    _texture(0).resize((60, 45)).save(tmp_path / "a0_small.png")
    images = ImageSet.from_folder(tmp_path)
    with pytest.raises(ValueError, match="3 groups"):
        images.split()
    images.near_duplicate_bits = None  # subjects only: three groups
    assert len(images.split().test) == 1


def test_source_series_drops_a_shot_number_only():
    from featmap.data.images import source_series

    wiki = "https://commons.wikimedia.org/wiki/File:"
    linda = source_series("Aschroet", wiki + "Windmill_Linda_1.jpg")
    assert linda == source_series("aschroet ", wiki + "Windmill_Linda_2.jpg") == "aschroet/windmill_linda"
    assert source_series("S G", wiki + "Anthias_anthias_Stefano_Guerrieri1.jpg") == \
        source_series("S G", wiki + "Anthias_anthias_Stefano_Guerrieri.jpg") == "s g/anthias_anthias_stefano_guerrieri"
    assert source_series("B", wiki + "Plier01.jpg") == "b/plier"
    assert source_series("M", wiki + "Red_Panda_(30324056733).jpg") == "m/red_panda_(30324056733)"  # a photo id
    dates = [source_series("S", wiki + f"Pagellus_acarne_04-08-0{d}.jpg") for d in (4, 5)]
    assert dates[0] != dates[1]  # a date is not a shot number
    assert source_series("G", wiki + "Giraffe_courtship_%2825657342808%29.jpg") == "g/giraffe_courtship_(25657342808)"
    pdp = "https://www.publicdomainpictures.net/en/view-image.php?image=182654&picture=old-hammer"
    assert source_series("George Hodan", pdp) == "george hodan/old_hammer"
    assert source_series("X", wiki + "Windmill_Linda_1.jpg") != source_series("Y", wiki + "Windmill_Linda_2.jpg")
    assert source_series("", "") == ""


def test_default_set_groups_shots_of_one_subject():
    images = ImageSet.default()
    merged = [g for g in images.groups if len(g.ids) > 1]
    assert ("gcompris/renewable/windmill14.webp", "gcompris/renewable/windmill9.webp") in [g.ids for g in merged]
    assert ("gcompris/fishes/fish14.webp", "gcompris/fishes/fish5.webp") in [g.ids for g in merged]
    assert not any("near-duplicate" in r for g in merged for r in g.reasons)  # no copies among the default photos
    for seed in range(3):
        split = images.split(seed=seed)
        side = {p.id: k for k in ("train", "val", "test") for p in getattr(split, k)}
        assert all(len({side[i] for i in g.ids}) == 1 for g in merged)
        assert abs(len(split.test) - 0.2 * len(images)) <= 1
