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
    ({"inverter_precision": "half"}, ValueError,
     "inverter_precision must be one of auto, float32, bfloat16, got 'half'"),
])
def test_wrong_parameters_name_themselves(kw, error, match):
    with pytest.raises(error, match=match):
        make(**kw)


def test_a_notebook_namespace_gives_its_parameters_and_refuses_unknown_ones():
    import types

    from featmap.run.presets import chapter_config, given

    ns = {"manipulations": ["grayscale"], "layers": ["blocks.6"], "seed": 3, "In": [], "_": 1, "pd": types,
          "run_chapter": lambda: 0, "RunConfig": RunConfig}
    c, extra = chapter_config("masking", given(ns))
    assert (c.chapter, c.layers, c.seed, extra) == ("masking", ["blocks.6"], 3, {})
    assert c.manipulations == ["grayscale"] and c.bootstrap == 1000  # the rest: the chapter's defaults
    with pytest.raises(ValueError, match="unknown parameter 'layerz' for the masking chapter; did you mean 'layers'"):
        chapter_config("masking", given({**ns, "layerz": ["blocks.4"]}))
    with pytest.raises(ValueError, match="unknown parameter 'spatial' for the masking chapter"):
        chapter_config("masking", {"spatial": ["none"]})  # geometric only


@pytest.mark.parametrize("kw, match", [
    ({"ridge": float("inf")}, "ridge must be 'auto' or a finite number"),
    ({"ridge": float("nan")}, "ridge"),
    ({"layers": ["blocks.6", "blocks.2"]}, "shallow to deep.*in depth order: \\['blocks.2', 'blocks.6'\\]"),
    ({"layers": ["blocks.4", "blocks.4"]}, "without repeats"),
    ({"layers": ["blocks.66"]}, "not a module of tf_efficientnet_lite0; similar: blocks.6"),
    ({"backbone": "resnet5O"}, "unknown backbone 'resnet5O'"),
])
def test_bad_values_fail_before_any_photo_or_model_loads(kw, match, monkeypatch):
    import featmap.data.images as images
    import featmap.features.backbone as backbone

    def loaded(*a, **k):
        raise AssertionError("a photo or a model was loaded before the parameters were checked")

    monkeypatch.setattr(images.ImageSet, "from_spec", loaded)
    monkeypatch.setattr(backbone, "create_model", loaded)
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_every_chapter_parameters_cell_equals_the_one_definition():
    import json

    from featmap.core.io import REPO_ROOT
    from featmap.run.presets import PRESETS, parameters_cell

    for chapter in PRESETS:
        cells = json.loads((REPO_ROOT / "book" / f"{chapter}.ipynb").read_text())["cells"]
        cell = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(cell) == 1, f"book/{chapter}.ipynb needs exactly one parameters cell"
        assert "".join(cell[0]["source"]) == parameters_cell(chapter), \
            f"book/{chapter}.ipynb's parameters cell drifted: run python -m featmap params --write"
        assert max(len(line) for line in parameters_cell(chapter).splitlines()) <= 120


def test_every_run_config_parameter_has_a_comment():
    from dataclasses import fields

    from featmap.run.presets import DOCS

    missing = [f.name for f in fields(RunConfig) if f.name != "chapter" and f.name not in DOCS]
    assert not missing, f"parameters without a one-line comment in featmap.run.presets.DOCS: {missing}"


def test_papermill_reads_every_parameter_of_every_cell():
    import logging

    from papermill.translators import PythonTranslator

    from featmap.run.presets import PRESETS, defaults, parameters_cell

    for chapter in PRESETS:
        handler = logging.Handler()
        records = []
        handler.emit = records.append
        logging.getLogger("papermill.translators").addHandler(handler)
        try:
            names = [p.name for p in PythonTranslator.inspect({"source": parameters_cell(chapter)})]
        finally:
            logging.getLogger("papermill.translators").removeHandler(handler)
        assert names == list(defaults(chapter)) and not records, (chapter, [r.getMessage() for r in records])
