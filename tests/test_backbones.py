import numpy as np
import pytest
import timm
import torch

from featmap.data.images import ImageSet, View, foolbox_photos
from featmap.features.backbone import (
    Backbone,
    FeatureSpec,
    create_model,
    load_checkpoint,
    rename_lite_keys,
)


def test_wheel_weights_classify_real_imagenet_photos(lite0):
    photos = foolbox_photos()
    pre = lite0.preprocessing
    images = np.stack([ImageSet.view(View(p), pre.size, pre.interpolation, pre.crop_pct) for p in photos])
    predicted = lite0.logits(images).argmax(1).numpy()
    expected = np.array([int(p.label.split("_")[-1]) for p in photos])
    assert (predicted == expected).sum() >= 17  # measured: 18 of 20 (OFFLINE.md)


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
    torch.save({"state_dict": lite0.model.state_dict()}, path)
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
