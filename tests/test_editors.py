"""Offline object-level editors: masks on planted objects, edits only where they should act, seeding,
the edit cache, skipped photos, and the bring-your-own manifest."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from featmap.core.registry import UnknownNameError
from featmap.data.images import ImageSet, Photo, View, load_rgb
from featmap.edits.editors import EDITORS, SplitEdit, get_editor, is_control
from featmap.edits.segmentation import judge_mask, object_mask
from featmap.edits.semantic import SkippedItem

SIDE = 96


def planted(seed: int, colour=(220, 40, 40), radius: int = 20, centre=(48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Returns (a disc of ``colour`` on a textured greenish background, the disc's (H, W) bool mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    base = np.array([100, 130, 90]) + 25 * np.sin(xx / 5.0 + seed)[..., None] + rng.normal(0, 8, (SIDE, SIDE, 3))
    disc = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 <= radius ** 2
    img = np.where(disc[..., None], np.array(colour) + rng.normal(0, 8, (SIDE, SIDE, 3)), base)
    return np.clip(img, 0, 255).astype(np.uint8), disc


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)


@pytest.fixture
def photos(tmp_path) -> list[View]:
    """Four planted photos of different colours, and one flat grey photo GrabCut cannot segment."""
    views = []
    for i, colour in enumerate([(220, 40, 40), (240, 200, 30), (30, 60, 200), (230, 230, 230)]):
        img, _ = planted(i, colour, radius=14 + 3 * i)
        Image.fromarray(img).save(tmp_path / f"p{i}.png")
    Image.fromarray(np.full((SIDE, SIDE, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    for path in [tmp_path / f"p{i}.png" for i in range(4)] + [tmp_path / "flat.png"]:
        photo = Photo(id=f"synth/{path.name}", path=path, source="test", label="x", licence="-", sha256=path.name)
        views.append(View(photo, 0))
    return views


def image_of(view: View) -> np.ndarray:
    return load_rgb(view.photo.path)


def test_mask_covers_the_planted_object_and_is_cached(tmp_path, monkeypatch):
    img, disc = planted(0)
    m = object_mask(img, cache_root=tmp_path)
    assert m.ok, m.reason
    iou = (m.mask & disc).sum() / (m.mask | disc).sum()
    assert iou > 0.9
    assert abs(m.fraction - disc.mean()) < 0.02
    stored = list((tmp_path / "masks").rglob("*.png"))
    assert len(stored) == 1
    import featmap.edits.segmentation as segmentation

    def no_grabcut(*args, **kwargs):
        raise AssertionError("GrabCut ran again")

    with monkeypatch.context() as patch:
        patch.setattr(segmentation, "grabcut_mask", no_grabcut)
        again = object_mask(img, cache_root=tmp_path)  # read back from the cache, not recomputed
        assert np.array_equal(again.mask, m.mask)
        with pytest.raises(AssertionError, match="GrabCut ran again"):
            object_mask(img, iterations=2, cache_root=tmp_path)  # the settings are part of the key
    assert object_mask(img, iterations=2, cache_root=tmp_path).ok
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 2


def test_failed_masks_say_why():
    empty = judge_mask(np.zeros((64, 64), bool), 1 / 8)
    assert not empty.ok and "no object" in empty.reason
    whole_box = np.zeros((64, 64), bool)
    whole_box[8:56, 8:56] = True
    full = judge_mask(whole_box, 1 / 8)
    assert not full.ok and "not separated" in full.reason
    flat = object_mask(np.full((64, 64, 3), 128, np.uint8))
    assert not flat.ok and flat.reason


def test_recolour_changes_only_the_object_to_the_target_hue():
    img, _ = planted(0)
    edit = get_editor("object_recolor")  # blue by default
    out = edit(img, 0, "synth/a#0")
    mask = edit.mask(img).mask
    diff = changed(img, out)
    assert diff.any() and not (diff & ~mask).any()
    target = colorsys.rgb_to_hsv(0, 64 / 255, 1)[0]
    hues = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in px))[0] for px in out[mask]])
    assert np.abs(hues - target).max() < 0.02
    # brightness (HSV value) is kept: shading survives the new colour
    assert np.abs(out[mask].max(axis=1).astype(int) - img[mask].max(axis=1)).max() <= 1


def test_remove_fills_only_the_grown_object_with_its_surroundings():
    img, disc = planted(1)
    edit = get_editor("object_remove")
    out = edit(img, 0, "synth/b#0")
    region = edit.region(img)
    diff = changed(img, out)
    assert diff.any() and not (diff & ~region).any()
    assert region.sum() >= edit.mask(img).mask.sum()
    background = img[~region].astype(float).mean(axis=0)
    assert np.abs(out[disc].astype(float).mean(axis=0) - background).max() < 25  # the red disc is gone
    assert np.abs(img[disc].astype(float).mean(axis=0) - background).max() > 80


def test_background_swap_keeps_the_object_and_takes_the_rest_from_another_photo(photos):
    edit = get_editor("background_swap").bind(photos, image_of)
    view = photos[0]
    img = image_of(view)
    out = edit(img, 0, view.key)
    partner = edit.partner_of(view.key, 0)
    assert partner.photo.id != view.photo.id
    mask = edit.mask(img).mask
    assert not (changed(img, out) & mask).any()
    assert np.array_equal(out[~mask], image_of(partner)[~mask])


def test_object_paste_changes_only_the_pasted_region(photos):
    edit = get_editor("object_paste", scale=0.5).bind(photos, image_of)
    view = photos[1]
    img = image_of(view)
    out, region = edit.pasted(img, 3, view.key)
    assert np.array_equal(out, edit(img, 3, view.key))
    assert region.any() and not (changed(img, out) & ~region).any()
    assert edit.partner_of(view.key, 3).photo.id != view.photo.id


NEW_EDITS = ["object_blur", "object_gray", "object_recolor_red", "object_recolor_green"]


@pytest.mark.parametrize("name", ["object_recolor", "object_remove", "background_swap", "object_paste", *NEW_EDITS])
def test_edits_are_deterministic_for_a_seed_and_a_rerun_edits_nothing(photos, tmp_path, name):
    view = photos[2]
    img = image_of(view)
    first = get_editor(name, cache_root=tmp_path / "a").bind(photos, image_of)
    fresh = get_editor(name, cache_root=tmp_path / "b").bind(photos, image_of)
    out = first(img, 5, view.key)
    assert np.array_equal(out, fresh(img, 5, view.key))  # recomputed from scratch: the same pixels
    assert first.edits_made == fresh.edits_made == 1
    rerun = get_editor(name, cache_root=tmp_path / "a").bind(photos, image_of)
    assert np.array_equal(rerun(img, 5, view.key), out)
    assert (rerun.edits_made, rerun.cache_hits) == (0, 1)
    assert list((tmp_path / "a" / "edits").rglob("*.png"))


@pytest.mark.parametrize("name", NEW_EDITS)
def test_photo_only_object_edits_change_only_the_planted_object(monkeypatch, name):
    from featmap.edits.segmentation import ObjectMask

    img, disc = planted(0)
    edit = get_editor(name)
    monkeypatch.setattr(edit, "mask", lambda image: ObjectMask(disc, float(disc.mean()), True))
    out = edit(img, 0, "synth/a#0")
    diff = changed(img, out)
    assert not (diff & ~disc).any()  # nothing outside the object moves
    assert diff.sum() > 0.9 * disc.sum()  # and nearly all of the object does
    assert edit.name == name and not is_control(name)
    inside = out[disc].astype(int)
    if name == "object_gray":
        assert (inside.max(axis=1) - inside.min(axis=1)).max() == 0
    elif name == "object_blur":
        assert inside.std(axis=0).mean() < 0.5 * img[disc].astype(int).std(axis=0).mean()  # the texture is smoothed
        assert np.abs(inside.mean(axis=0) - img[disc].mean(axis=0)).max() < 3  # no background bleeds in
    else:
        target = colorsys.rgb_to_hsv(*(c / 255 for c in {"red": (255, 0, 0), "green": (0, 200, 0)}[name[15:]]))[0]
        hues = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in px))[0] for px in out[disc]])
        assert np.abs((hues - target + 0.5) % 1 - 0.5).max() < 0.02


def test_recolour_presets_are_the_recolour_with_a_fixed_colour(tmp_path):
    img, _ = planted(2)
    red = get_editor("object_recolor_red", cache_root=tmp_path)
    assert red.params["colour"] == "#ff0000" and red.name == "object_recolor_red"
    plain = get_editor("object_recolor", colour="red", cache_root=tmp_path)
    assert np.array_equal(red(img, 0, "synth/a#0"), plain(img, 0, "synth/a#0"))
    assert red.cache_key(0) != plain.cache_key(0)  # another name, another row of the table
    assert get_editor("object_recolor_red", saturation=0.9).params["saturation"] == 0.9
    with pytest.raises(TypeError, match="object_recolor_red"):
        get_editor("object_recolor_red", colour="blue")
    with pytest.raises(ValueError, match="sigma"):
        get_editor("object_blur", sigma=0)
    assert get_editor("object_blur", sigma=0.05).cache_key(0) != get_editor("object_blur").cache_key(0)


def test_only_partner_edits_are_controls(photos):
    assert {name for name in EDITORS.names() if is_control(name)} == {"background_swap", "object_paste"}
    assert not any(is_control(name) for name in ("rotation_90", "grayscale", "no_such_edit", "object_paste_x"))
    parts = {"train": photos[:3], "test": photos[3:]}
    assert SplitEdit(lambda: get_editor("object_paste"), parts, image_of, 0).control
    assert not SplitEdit(lambda: get_editor("object_gray"), parts, image_of, 0).control


def test_partners_vary_with_the_seed_never_the_same_photo(photos):
    edit = get_editor("background_swap").bind(photos, image_of)
    chosen = {edit.partner_of(photos[0].key, s).photo.id for s in range(12)}
    assert len(chosen) > 1 and photos[0].photo.id not in chosen
    paste = get_editor("object_paste").bind(photos, image_of)
    donors = {paste.partner_of(photos[0].key, s).photo.id for s in range(12)}
    assert "synth/flat.png" not in donors  # a photo without a usable object gives none


def test_failed_mask_photos_are_skipped_with_a_reason_never_faked(photos):
    flat = next(v for v in photos if v.photo.id == "synth/flat.png")
    for name in ("object_recolor", "object_remove", "background_swap", *NEW_EDITS):
        edit = get_editor(name).bind(photos, image_of)
        usable = edit.usable(photos)
        assert flat not in usable and len(usable) == len(photos) - 1
        assert "object mask failed" in edit.skipped[flat.key]
        with pytest.raises(SkippedItem, match="object mask failed"):
            edit(image_of(flat), 0, flat.key)
    paste = get_editor("object_paste").bind(photos, image_of)
    assert paste.usable(photos) == photos  # the flat photo can receive another photo's object


def test_cache_key_follows_everything_that_changes_the_pixels(photos):
    recolour = get_editor("object_recolor")
    assert recolour.cache_key(0) == recolour.cache_key(1)  # deterministic edit: the seed does not matter
    assert recolour.cache_key(0) != get_editor("object_recolor", colour="red").cache_key(0)
    assert recolour.cache_key(0) != get_editor("object_recolor", margin=0.2).cache_key(0)
    swap = get_editor("background_swap").bind(photos, image_of)
    assert swap.cache_key(0) != swap.cache_key(1)
    other = get_editor("background_swap").bind(photos[:3], image_of)
    assert swap.cache_key(0) != other.cache_key(0)  # different partners to draw from
    assert swap.family == "semantic" and swap.grid_op is None and swap.box is None
    swap.check_grid(1, 1, "blocks.6")


def test_partner_editors_must_be_bound():
    img, _ = planted(0)
    with pytest.raises(RuntimeError, match="bind"):
        get_editor("background_swap")(img, 0, "synth/a#0")


def test_registry_names_and_parameters_are_checked():
    with pytest.raises(UnknownNameError, match="object_recolor"):
        get_editor("object_recolour_typo")
    assert {"object_recolor", "object_remove", "background_swap", "object_paste", "instruct_pix2pix",
            "qwen_image_edit", "inpaint", "object_blur", "object_gray", "object_recolor_red",
            "object_recolor_magenta"} <= set(EDITORS.names())
    with pytest.raises(TypeError, match="colour"):
        get_editor("object_recolor", color="blue")
    with pytest.raises(ValueError, match="#rrggbb"):
        get_editor("object_recolor", colour="bleu")
    assert get_editor("object_recolor", colour="#ff0000").params["colour"] == "#ff0000"
    with pytest.raises(TypeError, match="uint8"):
        get_editor("object_recolor")(np.zeros((8, 8, 3), np.float32))


# -- bring your own edits -------------------------------------------------------------------------------

def _textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture
def manifest(tmp_path):
    """Two originals (120x90 and 90x120) and their edits saved at twice the size, as a generator would."""
    folder = tmp_path / "pairs"
    (folder / "orig").mkdir(parents=True)
    (folder / "edited").mkdir()
    rows = ["original,edited,edit,prompt,seed"]
    for i, (h, w) in enumerate([(90, 120), (120, 90)]):
        img = _textured(h, w, i)
        Image.fromarray(img).save(folder / "orig" / f"{i}.png")
        Image.fromarray(img).resize((2 * w, 2 * h), Image.Resampling.BICUBIC).save(folder / "edited" / f"{i}.png")
        rows.append(f"orig/{i}.png,edited/{i}.png,upscaled,a larger copy,{i}")
    (folder / "edits.csv").write_text("\n".join(rows) + "\n")
    return folder / "edits.csv"


def test_manifest_edit_lines_up_with_the_original_view(manifest):
    from featmap.edits.manifest import manifest_edits, manifest_images, read_manifest

    pairs = read_manifest(manifest)
    assert [p.photo_id for p in pairs] == ["manifest/orig/0.png", "manifest/orig/1.png"]
    assert pairs[1].seed == 1 and pairs[0].prompt == "a larger copy"
    images = manifest_images(pairs)
    edit = manifest_edits(pairs)["upscaled"]
    view_of = lambda v: ImageSet.view(v, 64, "bicubic", 1.0, seed=0, crop_scale_min=0.35)  # noqa: E731
    views = [View(p, k) for p in images.photos for k in range(3)]  # index > 0: seeded random crop and flip
    edit.bind(views, view_of)
    assert edit.usable(views) == views
    for view in views:
        original = view_of(view)
        out = edit(original, 0, view.key)
        assert out.shape == original.shape
        # the edit is the original upscaled: aligned views differ by resampling only
        assert np.abs(out.astype(int) - original).mean() < 4
        assert np.abs(out[:, ::-1].astype(int) - original).mean() > 20  # and misalignment would show


def test_manifest_rejects_paths_that_escape_its_folder(tmp_path):
    from featmap.edits.manifest import read_manifest

    folder = tmp_path / "m"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "inside.png")
    (folder / "edits.csv").write_text("original,edited,edit\ninside.png,../outside.png,x\n")
    with pytest.raises(ValueError, match=r"line 2: edited '\.\./outside\.png' .* outside the manifest's folder"):
        read_manifest(folder / "edits.csv")
    (folder / "edits.csv").write_text(f"original,edited,edit\n{tmp_path / 'outside.png'},inside.png,x\n")
    with pytest.raises(ValueError, match="outside the manifest's folder"):
        read_manifest(folder / "edits.csv")


def test_manifest_names_missing_files_and_bad_headers(tmp_path):
    from featmap.edits.manifest import read_manifest

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "edits.csv").write_text("original,edited,edit\na.png,gone/b.png,x\n")
    with pytest.raises(FileNotFoundError, match=r"line 2: edited file 'gone/b\.png' not found"):
        read_manifest(tmp_path / "edits.csv")
    (tmp_path / "edits.csv").write_text("source,edited,edit\na.png,a.png,x\n")
    with pytest.raises(ValueError, match=r"missing \['original'\].*unknown \['source'\]"):
        read_manifest(tmp_path / "edits.csv")
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_manifest(tmp_path / "nowhere.csv")


def test_manifest_skips_photos_without_that_edit(manifest):
    from featmap.edits.manifest import manifest_edits, read_manifest

    text = manifest.read_text().splitlines()
    manifest.write_text("\n".join(text[:2] + [text[2].replace("upscaled", "other")]) + "\n")
    pairs = read_manifest(manifest)
    edits = manifest_edits(pairs)
    assert sorted(edits) == ["other", "upscaled"]
    views = [View(Photo(id=p.photo_id, path=p.original, source="manifest", label="", licence="", sha256=""))
             for p in pairs]
    usable = edits["upscaled"].bind(views, image_of).usable(views)
    assert [v.photo.id for v in usable] == ["manifest/orig/0.png"]
    assert "no edited image" in edits["upscaled"].skipped["manifest/orig/1.png#0"]


def test_cached_edits_are_lossless_pngs():
    import io

    from featmap.edits.segmentation import save_png

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (31, 17, 3), dtype=np.uint8), rng.integers(0, 2, (9, 8), dtype=np.uint8) * 255):
        f = io.BytesIO()
        save_png(f, image)
        f.seek(0)
        with Image.open(f) as back:
            assert back.format == "PNG" and np.array_equal(np.asarray(back), image)
