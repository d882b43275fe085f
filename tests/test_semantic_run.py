"""The semantic family through the pipeline: object-level edits on real photos, bring-your-own manifests."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featmap.core.registry import UnknownNameError
from featmap.edits.editors import SplitEdit
from featmap.report.panels import example_images
from featmap.run.chapter import run_chapter
from featmap.run.config import RunConfig


def semantic_config(**kw):
    return RunConfig(**{"chapter": "semantic", "manipulations": ["object_recolor", "background_swap"],
                        "layers": ["blocks.6"], "max_images": 30, "train_views": 1, "bootstrap": 100,
                        "mappings": ["identity", "linear"], "image_size": 160, "image_layers": "none", **kw})


def test_object_edits_run_on_the_photos_their_masks_allow_and_rerun_from_cache():
    result = run_chapter(semantic_config())
    table = result.table
    assert set(table.family) == {"semantic"}
    assert set(table.manipulation) == {"object_recolor", "background_swap"}
    for edit in result.manipulations:
        assert isinstance(edit, SplitEdit)
        usable = {v.key for v in edit.usable["test"]}
        tested = {v.key for v in result.split.views("test", 1)}
        # only photos with a usable object mask are scored; the others are recorded with a reason
        assert usable <= tested and usable
        assert all(k in edit.skipped for k in tested - usable)
        cos = table[(table.manipulation == edit.name) & (table.metric == "cos_mean")]
        assert (cos.n == len(usable)).all()
        # partners come from the same split part: a test photo never borrows from a training photo
        if edit.name == "background_swap":
            test_keys = {v.key for v in result.split.views("test", 1)}
            for key in usable:
                assert edit.parts["test"].partner_of(key, 0).key in test_keys - {key}
    lin = table[(table.metric == "cos_mean") & (table.mapping == "linear")].set_index("manipulation")["value"]
    ident = table[(table.metric == "cos_mean") & (table.mapping == "identity")].set_index("manipulation")["value"]
    assert (ident < 0.999).all()  # the edits move the features

    panels = example_images(result, n_photos=1, masks=True)[0][1]
    assert [name for name, _ in panels] == ["original", "object mask", "object_recolor", "background_swap"]

    again = run_chapter(semantic_config())
    assert again.extracted == 0 and sum(e.edits_made for e in again.manipulations) == 0
    timing = again.table.metric == "fit_seconds"
    pd.testing.assert_frame_equal(again.table[~timing].reset_index(drop=True),
                                  table[~timing].reset_index(drop=True))
    # claim 1's input: the linear map's paired gap over identity, on the same photos as its own score
    gaps = table[table.metric == "cos_mean_gap_identity"].set_index("manipulation")
    assert set(gaps.mapping) == {"linear"} and set(gaps.index) == set(lin.index)
    assert np.allclose(gaps["value"], (lin - ident).reindex(gaps.index), atol=1e-5)  # the mean of the differences
    assert (gaps["n"] == table[(table.metric == "cos_mean") & (table.mapping == "linear")].set_index(
        "manipulation")["n"].reindex(gaps.index)).all()


def _manifest(folder, photo_dir, rows_extra=""):
    originals = sorted(photo_dir.glob("*.jpg"))[:8]
    (folder / "orig").mkdir()
    (folder / "edit").mkdir()
    lines = ["original,edited,edit"]
    for p in originals:
        img = Image.open(p).convert("RGB")
        img.save(folder / "orig" / p.name)
        # edited elsewhere at another size (as a generative editor's 1024 px output would be)
        img.convert("L").convert("RGB").resize((300, 300)).save(folder / "edit" / f"{p.stem}.png")
        lines.append(f"orig/{p.name},edit/{p.stem}.png,made_grey")
    (folder / "edits.csv").write_text("\n".join(lines) + "\n" + rows_extra)
    return folder / "edits.csv"


def test_a_manifest_of_own_edits_runs_as_the_semantic_family(tmp_path, photo_dir):
    manifest = _manifest(tmp_path, photo_dir)
    config = semantic_config(manipulations=["made_grey"], edit_manifest=str(manifest), max_images=None,
                             test_fraction=0.3)
    result = run_chapter(config)
    table = result.table
    assert set(table.manipulation) == {"made_grey"} and set(table.family) == {"semantic"}
    assert len(result.images) == 8
    # the edited view is the user's grey image at the original's framing: grey, same shape
    view = result.split.views("test", 1)[0]
    edited = result.store.image(view, result.manipulations[0])
    assert edited.shape == result.store.image(view, None).shape
    assert np.abs(edited[..., 0].astype(int) - edited[..., 1]).max() <= 2
    lin = table[(table.metric == "cos_mean") & (table.mapping == "linear")]["value"].iloc[0]
    ident = table[(table.metric == "cos_mean") & (table.mapping == "identity")]["value"].iloc[0]
    assert lin > ident  # greying is learnable from a handful of photos


def test_bad_semantic_parameters_are_named(tmp_path, photo_dir):
    with pytest.raises(UnknownNameError, match="object_recolour.*editors: .*object_recolor"):
        semantic_config(manipulations=["object_recolour"])
    with pytest.raises(ValueError, match="editor_params names \\['background_swap'\\]"):
        semantic_config(manipulations=["object_recolor"], editor_params={"background_swap": {}})
    with pytest.raises(TypeError, match="editor_params must map"):
        semantic_config(editor_params={"object_recolor": "red"})
    with pytest.raises(TypeError, match="object_recolor"):
        run_chapter(semantic_config(manipulations=["object_recolor"], editor_params={"object_recolor": {"hue": 3}}))
    manifest = _manifest(tmp_path, photo_dir, rows_extra="../outside.jpg,edit/x.png,made_grey\n")
    with pytest.raises(ValueError, match="outside"):
        semantic_config(manipulations=["made_grey"], edit_manifest=str(manifest))
