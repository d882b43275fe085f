"""The Inverter interface contract, and the default decoder: it learns, it is cached, it resumes."""
import os

import numpy as np
import pytest
import torch

import featmap.core.io as io
import featmap.score.inversion as inversion
from featmap.data.images import ImageSet, View, to_uint8_images
from featmap.edits.manipulations import get_manipulation
from featmap.features.store import FeatureCache, FeatureStore
from featmap.score.images import ssim
from featmap.score.inversion import (
    CallableInverter,
    DecoderInverter,
    Inverter,
    InverterConfig,
    InverterData,
    fit_decoder,
    inverter_path,
    train_inverter,
)

# Small enough to train in seconds: blocks.4 (112 x 14 x 14) to 56 px, 6 photos x (original, mirror_h).
SMALL = InverterConfig(image_size=56, width=64, epochs=60, batch_size=4, lr=3e-3, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(lite0, tmp_path_factory):
    return FeatureStore(lite0, FeatureCache(tmp_path_factory.mktemp("features")), progress=False)


@pytest.fixture(scope="module")
def views(photo_dir):
    return [View(p, 0) for p in ImageSet.from_folder(photo_dir).photos[:6]]


MIRROR = [get_manipulation("mirror_h")]


def skimage_ssim(inverter, data):
    feats, images = data.tensors()
    return ssim(to_uint8_images(inverter.invert(feats)), images.permute(0, 2, 3, 1).numpy())


def test_decoder_output_contract(store, views, tmp_path):
    cfg = InverterConfig(image_size=40, width=32, epochs=1, batch_size=4, device="cpu")  # 40: not 14 * 2^k
    inv = train_inverter(store, views[:2], [], "blocks.4", cfg, cache_dir=tmp_path, progress=False)
    assert isinstance(inv, Inverter) and inv.layer == "blocks.4" and inv.image_size == 40
    out = inv.invert(store.load(views[:3], None, "blocks.4"), batch_size=2)
    assert out.shape == (3, 3, 40, 40) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="112-channel maps of blocks.4"):
        inv.invert(store.load(views[:1], None, "blocks.6"))
    with pytest.raises(ValueError, match="float"):
        inv.invert(torch.zeros(1, 112, 14, 14, dtype=torch.int64))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_user_inverter_plugs_in_and_returns_cpu_images_in_zero_one(device):
    decoder = torch.nn.Sequential(torch.nn.Conv2d(8, 3, 1), torch.nn.Upsample(size=32), torch.nn.Tanh()).to(device)
    inv = CallableInverter(decoder, layer="stage3", image_size=32, channels=8, value_range=(-1, 1), device=device)
    feats = torch.randn(5, 8, 4, 4)
    out = inv.invert(feats)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    expected = (decoder(feats.to(device)).cpu() + 1) / 2
    assert torch.allclose(out, expected.detach(), atol=1e-6)
    raw = CallableInverter(decoder, layer="stage3", image_size=32, device=device)  # claims [0, 1], gives [-1, 1]
    with pytest.raises(ValueError, match="must return \\[0, 1\\]"):
        raw.invert(feats * 10)
    wrong_size = CallableInverter(decoder, layer="stage3", image_size=64, device=device)
    with pytest.raises(ValueError, match="expected \\(5, 3, 64, 64\\)"):
        wrong_size.invert(feats)


def test_the_decoder_learns_to_reconstruct_its_training_images(store, views, tmp_path):
    data = InverterData.from_store(store, views, MIRROR, "blocks.4", SMALL.image_size)
    untrained = fit_decoder(data, "blocks.4", InverterConfig(**{**SMALL.__dict__, "epochs": 1, "lr": 1e-9}),
                            tmp_path, progress=False)
    trained = train_inverter(store, views, MIRROR, "blocks.4", SMALL, cache_dir=tmp_path, progress=False)
    before, after = skimage_ssim(untrained, data).mean(), skimage_ssim(trained, data).mean()
    assert before < 0.3 and after > 0.6, (before, after)
    assert trained.epochs_run == SMALL.epochs and trained.history["n_pairs"] == 12
    assert inverter_path(trained.key, tmp_path).is_file()

    again = train_inverter(store, views, MIRROR, "blocks.4", SMALL, cache_dir=tmp_path, progress=False)
    assert again.epochs_run == 0 and again.key == trained.key  # loaded from the cache, no epoch run
    feats = data.tensors()[0]
    assert torch.equal(again.invert(feats), trained.invert(feats))
    other = train_inverter(store, views, MIRROR, "blocks.4", InverterConfig(**{**SMALL.__dict__, "epochs": 1}),
                           cache_dir=tmp_path, progress=False)
    assert other.key != trained.key and other.epochs_run == 1  # another setting is another inverter


def test_a_cached_inverter_is_found_without_loading_any_data(store, views, tmp_path, monkeypatch):
    cfg = InverterConfig(image_size=28, width=16, epochs=1, batch_size=4, device="cpu")
    train_inverter(store, views[:2], [], "blocks.4", cfg, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(InverterData, "tensors", lambda self: pytest.fail("loaded data for a cached inverter"))
    assert train_inverter(store, views[:2], [], "blocks.4", cfg, cache_dir=tmp_path, progress=False).epochs_run == 0


@pytest.mark.usefixtures("every_epoch_checkpoints")
def test_an_interrupted_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(store, views, tmp_path,
                                                                                      monkeypatch):
    cfg = InverterConfig(image_size=28, width=16, epochs=4, batch_size=4, device="cpu")
    data = InverterData.from_store(store, views[:3], MIRROR, "blocks.4", cfg.image_size)
    whole = fit_decoder(data, "blocks.4", cfg, tmp_path / "whole", progress=False)

    real_write, writes = io.atomic_write, []

    def crash_on_third_write(path, write):
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt  # killed after two epochs were checkpointed
        real_write(path, write)

    monkeypatch.setattr(io, "atomic_write", crash_on_third_write)  # every cache and checkpoint writes through it
    with pytest.raises(KeyboardInterrupt):
        fit_decoder(data, "blocks.4", cfg, tmp_path / "cut", progress=False)
    assert all(p.name.endswith(".partial.pt") for p in writes[:2])
    monkeypatch.setattr(io, "atomic_write", real_write)
    resumed = fit_decoder(data, "blocks.4", cfg, tmp_path / "cut", progress=False)
    assert resumed.epochs_run == 2 and resumed.history["epochs"] == 4
    assert not list((tmp_path / "cut").rglob("*.partial.pt"))
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)  # the same run: bit for bit


@pytest.mark.parametrize("torn", ["final", "partial"])
def test_a_torn_file_is_rejected_and_the_work_redone(store, views, tmp_path, torn):
    cfg = InverterConfig(image_size=28, width=16, epochs=2, batch_size=4, device="cpu")
    data = InverterData.from_store(store, views[:2], [], "blocks.4", cfg.image_size)
    first = fit_decoder(data, "blocks.4", cfg, tmp_path, progress=False)
    path = inverter_path(first.key, tmp_path)
    if torn == "partial":
        path.unlink()
        path = path.with_name(f"{first.key}.partial.pt")
    path.write_bytes(b"PK\x03\x04 torn")
    again = fit_decoder(data, "blocks.4", cfg, tmp_path, progress=False)
    assert again.epochs_run == cfg.epochs
    assert isinstance(DecoderInverter.load(inverter_path(first.key, tmp_path)), DecoderInverter)


def test_in_memory_pairs_are_keyed_by_content_and_checked():
    feats, images = torch.randn(4, 8, 7, 7), np.zeros((4, 28, 28, 3), np.uint8)
    assert InverterData.from_tensors(feats, images).key == InverterData.from_tensors(feats.clone(), images).key
    assert InverterData.from_tensors(feats + 1, images).key != InverterData.from_tensors(feats, images).key
    with pytest.raises(ValueError, match="N > 0"):
        InverterData.from_tensors(feats[:3], images).tensors()
    with pytest.raises(ValueError, match="image_size must be > 0"):
        InverterConfig(image_size=0)


def test_feature_matching_compares_the_backbones_own_features_with_gradients(store, views, tmp_path):
    """``FeatureMatch`` gives the layer's features of [0, 1] images at the backbone's input size (those the store
    extracts, for images already at that size), differentiable with respect to the images; training with it is
    cached under another key than pixels alone, and a negative weight is refused."""
    from featmap.score.inversion import FeatureMatch, feature_cosine

    backbone = store.backbone
    match = FeatureMatch(backbone, "blocks.4")
    side = backbone.preprocessing.size
    photos = np.stack([store.image(v, None) for v in views[:2]])
    images = torch.from_numpy(to_uint8_images(photos, side)).permute(0, 3, 1, 2).float().div(255).requires_grad_()
    feats = match(images)
    want = backbone.features(to_uint8_images(photos, side))["blocks.4"]
    assert torch.allclose(feats.detach(), want, atol=1e-4)
    assert feats.is_contiguous() and want.is_contiguous()  # channels-last inside, plain NCHW handed out
    assert torch.allclose(feature_cosine(feats.detach(), want), torch.ones(2), atol=1e-5)
    (1 - feature_cosine(feats, want).mean()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in backbone.model.parameters())  # the judge's weights stay frozen
    cfg = InverterConfig(image_size=28, width=16, epochs=1, batch_size=4, device="cpu")
    matched = InverterConfig(**{**cfg.__dict__, "feature_weight": 1.0, "feature_samples": 2})
    plain = train_inverter(store, views[:2], [], "blocks.4", cfg, cache_dir=tmp_path, progress=False)
    with_features = train_inverter(store, views[:2], [], "blocks.4", matched, cache_dir=tmp_path, progress=False)
    assert plain.key != with_features.key and with_features.epochs_run == 1
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        InverterConfig(feature_weight=-1.0)


def test_the_training_precision_is_checked_resolved_and_part_of_the_key(monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        InverterConfig(precision="half")
    assert InverterConfig(precision="float32").train_dtype() is None
    assert InverterConfig(precision="bfloat16").train_dtype() is torch.bfloat16
    assert InverterConfig(precision="float32").identity()["precision"] == "float32"
    assert InverterConfig(precision="bfloat16").identity()["precision"] == "bfloat16"
    # auto: bfloat16 only where the device computes it natively; the key holds the resolved precision
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(inversion, "native_bfloat16", lambda device, native=native: native)
        assert InverterConfig(precision="auto", device="cpu").identity()["precision"] == expected
    monkeypatch.undo()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert inversion.native_bfloat16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_bfloat16_decoder_learns_like_a_float32_one(store, views, tmp_path):
    data = InverterData.from_store(store, views, MIRROR, "blocks.4", SMALL.image_size)
    scores = {}
    for precision in ("float32", "bfloat16"):
        cfg = InverterConfig(**{**SMALL.__dict__, "epochs": 30, "precision": precision})
        scores[precision] = skimage_ssim(fit_decoder(data, "blocks.4", cfg, tmp_path, progress=False), data).mean()
    assert scores["bfloat16"] > 0.5 and abs(scores["bfloat16"] - scores["float32"]) < 0.05, scores


def test_the_training_ssim_is_the_windowed_ssim():
    """Planted: the 7x7 uniform-window SSIM computed window by window in float64 (population variances)."""
    from featmap.score.inversion import ssim_torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 10, 12, generator=g)
    y = (0.6 * x + 0.4 * torch.rand(2, 3, 10, 12, generator=g)).clamp(0, 1)
    c1, c2, w = 0.01 ** 2, 0.03 ** 2, 7
    want = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        vals = []
        for c in range(3):
            for i in range(10 - w + 1):
                for j in range(12 - w + 1):
                    px, py = x[b, c, i:i + w, j:j + w].double(), y[b, c, i:i + w, j:j + w].double()
                    mx, my = px.mean(), py.mean()
                    vx, vy = ((px - mx) ** 2).mean(), ((py - my) ** 2).mean()
                    cxy = ((px - mx) * (py - my)).mean()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        want[b] = torch.stack(vals).mean()
    assert torch.allclose(ssim_torch(x, y).double(), want, atol=1e-5)
    assert torch.allclose(ssim_torch(x, x), torch.ones(2), atol=1e-5) and float(ssim_torch(x, y).max()) < 0.99


@pytest.mark.parametrize("side", [1, 5, 28])
def test_the_upsampling_block_is_nearest_upsampling_then_its_convolution(side):
    """UpsampleConv2d (one transposed convolution) against what it stands for, nn.Upsample(x2, nearest) then a 3x3
    convolution (padding 1) with the same parameters: outputs and gradients in float64, borders included."""
    from featmap.score.inversion import UpsampleConv2d

    g = torch.Generator().manual_seed(side)
    block = UpsampleConv2d(6, 4).double()
    with torch.no_grad():
        block.weight.copy_(torch.randn(block.weight.shape, generator=g, dtype=torch.float64))
        block.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    plain = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"),
                                torch.nn.Conv2d(6, 4, 3, padding=1)).double()
    plain[1].load_state_dict(block.state_dict())
    x = torch.randn(2, 6, side, side + 3, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = block(xa), plain(xb)
    assert out.shape == want.shape == (2, 4, 2 * side, 2 * side + 6)
    assert torch.allclose(out, want, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    want.backward(grad)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-12)
    assert torch.allclose(block.weight.grad, plain[1].weight.grad, atol=1e-10)
    assert torch.allclose(block.bias.grad, plain[1].bias.grad, atol=1e-10)
    assert float(out.detach().abs().max()) > 1  # not a trivially zero map
