import pytest

from featmap.core.registry import UnknownNameError
from featmap.run.config import RunConfig


def make(**kw):
    return RunConfig(**{"chapter": "geometric", "manipulations": ["rotation_90"], **kw})


def test_defaults_are_valid_and_printable():
    c = make()
    assert c.layers == ["blocks.2", "blocks.4", "blocks.6"] and c.families() == ["geometric"]
    assert '"backbone": "tf_efficientnet_lite0"' in str(c)
    assert make(manipulations=["grayscale", "mask_big_square_center"]).families() == ["photometric", "masking"]


@pytest.mark.parametrize("kw,error,match", [
    ({"layers": "blocks.4"}, TypeError, r"layers must be a non-empty list.*-y 'layers: \[blocks.4\]'"),
    ({"layers": []}, TypeError, "layers must be a non-empty list"),
    ({"manipulations": ["rotate_90"]}, UnknownNameError,
     "unknown manipulation or editor 'rotate_90'; manipulations: .*rotation_90.*; editors: .*object_recolor"),
    ({"mappings": ["linear", "mlpp"]}, UnknownNameError, "unknown mapping 'mlpp'; known:"),
    ({"spatial": ["sideways"]}, ValueError, "unknown spatial mode 'sideways'; known: none, applied"),
    ({"seed": "1"}, TypeError, "seed must be an integer"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"train_views": 0}, ValueError, r"train_views must be in \[1, 64\]"),
    ({"ridge": "strong"}, TypeError, "ridge must be a number"),
    ({"ridge": -1.0}, ValueError, "ridge must be in"),
    ({"test_fraction": 1}, ValueError, "test_fraction"),
    ({"skip_bad_images": "yes"}, TypeError, "skip_bad_images must be True or False"),
    ({"max_images": 2}, ValueError, "max_images"),
    ({"images": None}, TypeError, "images must be a non-empty string"),
    ({"chapter": "my chapter"}, ValueError, "chapter must be a plain name"),
    ({"threads": True}, TypeError, "threads must be an integer"),
])
def test_wrong_parameters_name_themselves(kw, error, match):
    with pytest.raises(error, match=match):
        make(**kw)


def test_from_namespace_takes_only_parameters():
    ns = {"manipulations": ["grayscale"], "layers": ["blocks.6"], "seed": 3, "unrelated": object()}
    c = RunConfig.from_namespace("masking", ns)
    assert (c.chapter, c.layers, c.seed) == ("masking", ["blocks.6"], 3)
