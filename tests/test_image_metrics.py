"""Image-space metrics checked against known properties: identical images, growing noise, input ranges,
and the documented absence of LPIPS where its AlexNet weights are not on this machine."""
import numpy as np
import pytest
import torch

import featmap.score.images as metrics
from featmap.core.seeding import rng_for
from featmap.data.images import load_rgb, square_view, to_uint8_images
from featmap.score.images import (
    IMAGE_METRICS,
    absent_image_metrics,
    cos_reextract,
    lpips_available,
    lpips_distance,
    score_images,
    ssim,
    st_lpips_distance,
)
from featmap.score.metrics import METRICS

NOISE = [8, 32, 96]  # Gaussian noise sigma in grey levels


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(photo_dir):
    """Three real photos as uint8 (3, 112, 112, 3)."""
    return np.stack([square_view(load_rgb(p), 112) for p in sorted(photo_dir.glob("*.jpg"))[:3]])


def noisy(images, sigma):
    noise = rng_for(0, "test-noise", sigma).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def test_ssim_is_one_for_identical_images_and_falls_with_noise(photos):
    assert np.allclose(ssim(photos, photos), 1.0)
    means = [ssim(photos, noisy(photos, s)).mean() for s in NOISE]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] < 0.3


def test_st_lpips_is_zero_for_identical_images_grows_with_noise_and_tolerates_shifts(photos):
    assert np.allclose(st_lpips_distance(photos, photos), 0.0, atol=1e-6)
    dists = [st_lpips_distance(photos, noisy(photos, s)).mean() for s in NOISE]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    shifted = np.roll(photos, 2, axis=2)  # two pixels to the right
    assert st_lpips_distance(photos, shifted).mean() < dists[1]


def test_image_metrics_take_uint8_hwc_and_lpips_inputs_are_scaled_to_minus_one_one(photos):
    as_float = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255
    with pytest.raises(ValueError, match="uint8"):
        ssim(photos.astype(np.float32), photos)
    with pytest.raises(ValueError, match="equal shape"):
        st_lpips_distance(photos, photos[:, :64, :64])
    assert np.array_equal(to_uint8_images(as_float), photos)  # float [0, 1] -> uint8 is exact on a round trip
    ends = metrics._to_signed(np.array([[[[0, 128, 255]]]], dtype=np.uint8), torch.device("cpu"))
    assert ends.flatten().tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # torchvision, inside lpips
def test_lpips_plumbing_with_an_untrained_trunk(photos):
    """The package's own model class with a random trunk (no download): checks our input path, not LPIPS values."""
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    assert np.allclose(metrics._perceptual(model, photos, photos, 3), 0.0, atol=1e-6)
    dists = [metrics._perceptual(model, photos, noisy(photos, s), 3).mean() for s in NOISE]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_missing_lpips_weights_are_a_documented_absence_not_a_number(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    ok, reason = lpips_available()
    assert not ok and "alexnet-owt-7be5be79.pth" in reason and "empty_torch_home" in reason
    with pytest.raises(RuntimeError, match="AlexNet"):
        lpips_distance(photos, photos)
    assert absent_image_metrics() == {"lpips": reason}
    scores = score_images(torch.from_numpy(photos).permute(0, 3, 1, 2) / 255, photos, None, "blocks.6",
                          metrics=["ssim", "lpips"])
    assert list(scores) == ["ssim"]


@pytest.mark.skipif(not lpips_available()[0], reason=lpips_available()[1])
def test_lpips_is_zero_for_identical_images_and_grows_with_noise(photos):
    assert np.allclose(lpips_distance(photos, photos), 0.0, atol=1e-6)
    dists = [lpips_distance(photos, noisy(photos, s)).mean() for s in NOISE]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_cos_reextract_is_one_for_identical_images_and_lower_for_other_photos(photos, lite0):
    mean, median = cos_reextract(lite0, "blocks.6", photos, photos)
    assert np.allclose(mean, 1.0, atol=1e-5) and np.allclose(median, 1.0, atol=1e-5)
    other_mean, other_median = cos_reextract(lite0, "blocks.6", photos, np.roll(photos, 1, axis=0))
    assert (other_mean < 0.9).all() and other_mean.shape == (3,)
    with pytest.raises(ValueError, match="not hooked"):
        cos_reextract(lite0, "blocks.5", photos, photos)


def test_score_images_resizes_reconstructions_to_the_reference_and_returns_per_sample_values(photos, lite0):
    small = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255  # (3, 3, 112, 112)
    half = torch.nn.functional.interpolate(small, size=56, mode="bilinear", antialias=True)
    scores = score_images(half, photos, lite0, "blocks.6")
    expected = [m for m in IMAGE_METRICS if m not in absent_image_metrics()]
    assert list(scores) == expected and all(v.shape == (3,) for v in scores.values())
    assert (scores["ssim"] > 0.5).all() and (scores["ssim"] < 1).all()  # a blurred copy: similar, not equal
    exact = score_images(small, photos, lite0, "blocks.6", metrics=["ssim", "st_lpips"])
    assert np.allclose(exact["ssim"], 1.0) and np.allclose(exact["st_lpips"], 0.0, atol=1e-6)
    assert METRICS.get("st_lpips").higher_is_better is False and METRICS.get("ssim").higher_is_better
    with pytest.raises(ValueError, match="not an image metric"):
        score_images(small, photos, lite0, "blocks.6", metrics=["cos_mean"])
