"""The CUDA path: the same code as on the CPU, run on a device and held to the CPU's answers and planted maps.

Skipped where torch sees no CUDA device; ``bench/gpu-check.sh`` runs them on a GPU (``pytest -k cuda``).
``FEATMAP_TEST_DEVICE=cpu`` rehearses them on the CPU (the comparisons are then CPU against CPU).
"""
import dataclasses
import os

import numpy as np
import pytest
import torch
from test_inversion import SMALL, skimage_ssim
from test_learned import Pairs, shared_affine

import featmap.maps.learned as learned
from featmap.data.images import ImageSet, View
from featmap.edits.manipulations import get_manipulation
from featmap.features.backbone import Backbone
from featmap.features.store import FeatureCache, FeatureStore
from featmap.maps.base import MapOptions, get_mapping
from featmap.score.inversion import InverterData, fit_decoder, train_inverter
from featmap.score.metrics import cos_mean
from featmap.train.loop import TrainConfig

DEVICE = os.environ.get("FEATMAP_TEST_DEVICE", "cuda")

pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device here: bench/gpu-check.sh runs these on a GPU")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cpu_lite0():
    """Lite0 on the CPU, named so: the session's ``lite0`` takes device 'auto', which is the GPU where there is one."""
    return Backbone("tf_efficientnet_lite0", ["blocks.4", "blocks.6"], device="cpu")


@pytest.fixture(scope="module")
def images(photo_dir, cpu_lite0):
    views = [View(p, 0) for p in ImageSet.from_folder(photo_dir).photos[:8]]
    pre = cpu_lite0.preprocessing
    return np.stack([ImageSet.view(v, pre.size, pre.interpolation, pre.crop_pct) for v in views])


def test_cuda_backbone_gives_the_cpu_features(cpu_lite0, images):
    """Lite0 on the device: the same checkpoint, the same batch norms folded, features on the CPU as float32 NCHW
    and within TF32 rounding of the CPU's (cuDNN's float32 convolutions run in TF32 by default; the cache stores
    float16, whose rounding is of the same order)."""
    dev = Backbone("tf_efficientnet_lite0", ["blocks.4", "blocks.6"], device=DEVICE)
    assert dev.device.type == torch.device(DEVICE).type and cpu_lite0.device.type == "cpu"
    assert (dev.weights_id, dev.folded) == (cpu_lite0.weights_id, cpu_lite0.folded) and dev.folded > 0
    ours, theirs = dev.features(images), cpu_lite0.features(images)
    for layer in ("blocks.4", "blocks.6"):
        a, b = ours[layer], theirs[layer]
        assert a.device.type == "cpu" and a.dtype == torch.float32 and a.shape == b.shape, layer
        cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))  # per image
        assert float(cos.min()) > 0.999, (layer, cos)
        assert _relative(a, b) < 2e-2, (layer, _relative(a, b))
    # the judge's early stop works on the device too (another batch size: other TF32 kernels, so a relative bound)
    only = dev.features(images[:2], ["blocks.4"])
    assert list(only) == ["blocks.4"] and _relative(only["blocks.4"], ours["blocks.4"][:2]) < 2e-2


@pytest.mark.parametrize("name", ["linear_sgd", "mlp", "transformer", "cnn"])
def test_cuda_trained_maps_fit_a_planted_shared_affine_map_and_repeat_for_a_seed(tmp_path, name):
    x, y, _, _ = shared_affine(0)
    data = Pairs(x, y)
    train = TrainConfig(lr=1e-2, batch_size=64, max_steps=360, eval_every=10, patience=360, plateau_steps=360, seed=0)
    first, again = (get_mapping(name, MapOptions(size="tiny", progress=False, device=DEVICE, train=train,
                                                 start="identity", cache_dir=str(tmp_path / run))).fit(data)
                    for run in "ab")
    xt, yt = data.tensors("test")
    pred = first.predict(xt)
    assert pred.device.type == "cpu" and pred.dtype == torch.float32
    fitted, identity = float(cos_mean(pred, yt).mean()), float(cos_mean(xt, yt).mean())
    assert fitted > 0.97 and fitted > identity + 0.2, (name, fitted, identity)
    # seeded: a second fit from scratch gives the same map (up to the device's non-deterministic reductions)
    assert torch.allclose(again.predict(xt), pred, atol=1e-3), name


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_cuda_dropout_keeps_one_minus_p_scaled_and_is_seeded(p):
    drop = learned.Dropout(p).train()
    x = torch.ones(200_000, device=DEVICE)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert a.device.type == torch.device(DEVICE).type and torch.equal(a, b)
    kept = a != 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 0.005
    assert torch.allclose(a[kept], torch.full_like(a[kept], 1 / (1 - drop.threshold / 65536)))


def test_cuda_encoder_layer_computes_torchs_layer():
    torch.manual_seed(0)
    ours = learned.TokenTransformer(6, 16, 8, 2, 2, 16, 0.0, False, attention_dropout=0.0).to(DEVICE)
    theirs = learned.TokenTransformer(6, 16, 8, 2, 2, 16, 0.0, False, attention_dropout=0.0).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    for layer in theirs.encoder.layers:
        layer.__class__ = torch.nn.TransformerEncoderLayer
    x = torch.randn(4, 6, 4, 4, device=DEVICE)
    outs = []
    for net in (ours, theirs):
        outs.append(net.train()(x))
        outs[-1].square().sum().backward()
    assert torch.allclose(*outs, atol=1e-4)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-3, rtol=1e-3), name


def test_cuda_inverter_trains_in_bfloat16_where_the_device_has_it(cpu_lite0, photo_dir, tmp_path):
    """The inverter's 'auto' precision is bfloat16 on a GPU: it still learns (SSIM of its reconstructions rises),
    and its images come back on the CPU as float32 in [0, 1]."""
    store = FeatureStore(cpu_lite0, FeatureCache(tmp_path / "features"), progress=False)
    views = [View(p, 0) for p in ImageSet.from_folder(photo_dir).photos[:6]]
    mirror = [get_manipulation("mirror_h")]
    cfg = dataclasses.replace(SMALL, device=DEVICE, precision="auto")
    if torch.device(DEVICE).type == "cuda":
        assert cfg.train_dtype() == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    data = InverterData.from_store(store, views, mirror, "blocks.4", cfg.image_size)
    untrained = fit_decoder(data, "blocks.4", dataclasses.replace(cfg, epochs=1, lr=1e-9),
                            tmp_path / "u", progress=False)
    trained = train_inverter(store, views, mirror, "blocks.4", cfg, cache_dir=tmp_path / "t", progress=False)
    out = trained.invert(data.tensors()[0][:3])
    assert out.device.type == "cpu" and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    before, after = skimage_ssim(untrained, data).mean(), skimage_ssim(trained, data).mean()
    assert before < 0.3 and after > 0.6, (before, after)
