import numpy as np
import pytest
import torch
from PIL import Image

from featmap.core.registry import UnknownNameError
from featmap.edits.manipulations import (
    MANIPULATIONS,
    REFERENCE_SETS,
    get_manipulation,
    mask,
)

ALL_REFERENCE = [n for names in REFERENCE_SETS.values() for n in names]


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("deg", [90, 180, 270])
def test_rotation_matches_pil_counter_clockwise(image, deg):
    assert np.array_equal(get_manipulation(f"rotation_{deg}")(image), np.array(Image.fromarray(image).rotate(deg)))


def test_mirrors_match_pil(image):
    from PIL import ImageOps

    assert np.array_equal(get_manipulation("mirror_h")(image), np.array(ImageOps.mirror(Image.fromarray(image))))
    assert np.array_equal(get_manipulation("mirror_v")(image), np.array(ImageOps.flip(Image.fromarray(image))))


@pytest.mark.parametrize("name", REFERENCE_SETS["geometric"])
def test_grid_op_is_the_same_permutation_as_the_image_edit(image, name):
    m = get_manipulation(name)
    as_grid = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]  # an image is a (1, 3, H, W) "feature map"
    assert np.array_equal(m.grid_op(as_grid)[0].permute(1, 2, 0).numpy(), m(image))


def test_grid_rotations_compose():
    x = torch.randn(2, 5, 7, 7)
    r90 = get_manipulation("rotation_90").grid_op
    assert torch.equal(r90(r90(r90(r90(x)))), x)
    assert torch.equal(r90(r90(x)), get_manipulation("rotation_180").grid_op(x))
    assert torch.equal(r90(r90(r90(x))), get_manipulation("rotation_270").grid_op(x))
    h, v = get_manipulation("mirror_h").grid_op, get_manipulation("mirror_v").grid_op
    assert torch.equal(get_manipulation("rotation_180").grid_op(x), h(v(x)))


def test_image_rotation_180_is_both_mirrors(image):
    h, v = get_manipulation("mirror_h"), get_manipulation("mirror_v")
    assert np.array_equal(get_manipulation("rotation_180")(image), h(v(image)))
    assert np.array_equal(get_manipulation("rotation_450")(image), get_manipulation("rotation_90")(image))


def test_noise_is_seeded_per_item_and_seed(image):
    noise = get_manipulation("noise_40")
    a = noise(image, seed=1, item="photo#0")
    assert np.array_equal(a, noise(image, seed=1, item="photo#0"))
    assert not np.array_equal(a, noise(image, seed=2, item="photo#0"))
    assert not np.array_equal(a, noise(image, seed=1, item="photo#1"))
    assert noise.cache_key(1) != noise.cache_key(2)
    assert get_manipulation("grayscale").cache_key(1) == get_manipulation("grayscale").cache_key(2)


def test_noise_has_the_stated_sigma():
    grey = np.full((256, 256, 3), 128, np.uint8)  # far from the clip at 0 and 255
    diff = get_manipulation("noise_20")(grey, seed=0).astype(float) - 128
    assert abs(diff.mean()) < 0.3
    assert 19.0 < diff.std() < 20.5  # truncation toward zero shrinks it slightly


def test_photometric_properties(image):
    grey = get_manipulation("grayscale")(image)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    luma = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    assert np.abs(grey[..., 0] - luma).max() <= 1.0
    assert np.array_equal(get_manipulation("hue_shift_60")(grey), grey)  # no saturation: no hue to shift
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    shifted = get_manipulation("hue_shift_85")(red)  # a third of a turn: red -> green
    assert shifted[0, 0, 1] > 240 and shifted[0, 0, 0] < 15


def test_reference_masks_at_288_px_cover_the_reference_pixels():
    img = np.zeros((288, 288, 3), np.uint8)
    for name, (lo, hi, colour) in {"mask_top_left_square": (26, 103, (255, 0, 0)),
                                   "mask_bottom_right_square": (180, 270, (0, 255, 0)),
                                   "mask_big_square_center": (90, 193, (0, 0, 255)),
                                   "mask_small_square_center": (116, 154, (255, 255, 0))}.items():
        out = get_manipulation(name)(img)
        painted = (out != 0).any(axis=2)
        ys, xs = np.nonzero(painted)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (lo, hi, lo, hi), name
        assert tuple(out[lo, lo]) == colour


def test_masks_are_resolution_independent():
    m = get_manipulation("mask_big_square_center")
    small = (m(np.zeros((100, 100, 3), np.uint8)) != 0).any(axis=2)
    large = (m(np.zeros((400, 400, 3), np.uint8)) != 0).any(axis=2)
    assert abs(large.mean() - small.mean()) < 0.01


def test_parameterised_names_come_from_the_same_functions(image):
    assert get_manipulation("noise_12.5").params == (12.5,)
    custom = get_manipulation("mask_0.25_0.25_0.75_0.75_ff0000")
    assert custom == mask((0.25, 0.25, 0.75, 0.75), (255, 0, 0))
    assert tuple(custom(image)[24, 24]) == (255, 0, 0)
    assert get_manipulation("hue_shift_-20").params == (-20,)


def test_every_reference_manipulation_is_pure(image):
    before = image.copy()
    for name in ALL_REFERENCE:
        out = get_manipulation(name)(image, seed=3, item="x")
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(image, before), f"{name} changed its input"


def test_bad_names_and_parameters():
    with pytest.raises(UnknownNameError, match="known: .*grayscale"):
        get_manipulation("blur_3")
    with pytest.raises(ValueError, match="multiple of 90"):
        get_manipulation("rotation_45")
    with pytest.raises(ValueError, match="mask box"):
        mask((0.5, 0.5, 0.2, 0.9), (0, 0, 0))
    with pytest.raises(TypeError, match="uint8"):
        get_manipulation("grayscale")(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError):
        MANIPULATIONS.get(90)


def test_layer_too_small_for_a_manipulation():
    get_manipulation("mask_small_square_center").check_grid(7, 7, "blocks.6")  # 0.95 cells: fine
    with pytest.raises(ValueError, match="blocks.x.*too small|covers"):
        get_manipulation("mask_small_square_center").check_grid(2, 2, "blocks.x")
    with pytest.raises(ValueError, match="too small"):
        get_manipulation("rotation_90").check_grid(1, 1, "head")
    with pytest.raises(ValueError, match="square"):
        get_manipulation("rotation_90").check_grid(7, 5, "blocks.6")
    get_manipulation("rotation_180").check_grid(7, 5, "blocks.6")
