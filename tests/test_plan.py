"""The plan: one resolution of a run's cells, executed alike by the chapter run, the distributed prepare and the
layers run; a warm rerun computes nothing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from featmap.edits.manipulations import get_manipulation
from featmap.run.config import RunConfig
from featmap.run.plan import Plan

GEOMETRIC = ["rotation_90", "rotation_180", "rotation_270", "mirror_h", "mirror_v", "noise_40", "hue_shift_60",
             "grayscale"]
CLOSED = {"identity", "additive", "linear", "procrustes", "local_linear"}
PER_POSITION = CLOSED | {"linear_sgd", "mlp"}
ALL = PER_POSITION | {"cnn", "transformer", "transformer_pe"}


def test_the_default_geometric_chapter_plan():
    config = RunConfig(chapter="geometric", manipulations=GEOMETRIC)
    manips = [get_manipulation(n) for n in GEOMETRIC]
    assert [layer for layer in config.layers if config.scores_images_on(layer)] == ["blocks.2"]  # image: first
    plan = Plan.build(config, manips, config.layers, image_layers={"blocks.2"})
    assert len(plan.cells) == 3 * (5 * 2 + 3)  # layers x (geometric edits x {none, applied} + photometric)
    for cell in plan.cells:
        maps = {m.name for m in cell.mappings}
        geometric = cell.manipulation.grid_op is not None
        if cell.layer != "blocks.6":  # trained maps run at the last layer only
            assert maps == CLOSED
        elif geometric and cell.spatial == "none":  # the raw grid: closed-form per-position maps (the floor)
            assert maps == CLOSED
        else:
            assert maps == ALL
        assert cell.comparable == (cell.spatial == ("applied" if geometric else "none"))
        assert cell.semantics == (cell.layer == "blocks.6")
        # image space at the first layer, where the trained global maps do not run by default
        expected = {"identity", "linear", "local_linear"} if cell.layer == "blocks.2" and cell.comparable else set()
        assert set(cell.images) == expected
    assert len(plan.fits()) == sum(len(c.mappings) for c in plan.cells)
    assert [len(cells) for _, _, cells in plan.groups()] == [2] * 15 + [1] * 9  # per (manipulation, layer)


def test_a_learned_spatial_mode_runs_only_maps_that_mix_positions():
    config = RunConfig(chapter="geometric", manipulations=["mirror_h"], spatial=["learned"], layers=["blocks.6"])
    (cell,) = Plan.build(config, [get_manipulation("mirror_h")], config.layers).cells
    assert {m.name for m in cell.mappings} == {"cnn", "transformer", "transformer_pe"} and not cell.comparable


def test_control_edits_add_the_raw_grid_for_the_global_maps_of_those_edits_only():
    names = ["rotation_90", "mirror_h", "grayscale"]
    config = RunConfig(chapter="geometric", manipulations=names, layers=["blocks.6"], control_edits=["rotation_90"])
    plan = Plan.build(config, [get_manipulation(n) for n in names], config.layers)
    cells = {(c.manipulation.name, c.spatial): {m.name for m in c.mappings} for c in plan.cells}
    assert cells[("rotation_90", "learned")] == {"transformer", "transformer_pe"}
    assert ("mirror_h", "learned") not in cells and set(cells) == {
        ("rotation_90", "none"), ("rotation_90", "applied"), ("rotation_90", "learned"), ("mirror_h", "none"),
        ("mirror_h", "applied"), ("grayscale", "none")}
    for bad in (["grayscale"], ["rotation_180"]):  # not geometric; not among the manipulations
        with pytest.raises(ValueError, match="control_edits"):
            RunConfig(chapter="geometric", manipulations=names, layers=["blocks.6"], control_edits=bad)


@pytest.fixture(scope="module")
def tiny(photo_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("plan-cache")
    return RunConfig(chapter="masking", manipulations=["mask_big_square_center", "grayscale"],
                     layers=["blocks.4", "blocks.6"], images=str(photo_dir), mappings=["identity", "linear", "mlp"],
                     map_size="tiny", max_epochs=2, bootstrap=50, train_views=1, image_photos=2, inverter_epochs=1,
                     threads=1, cache_dir=str(cache))


def _spy_plans(monkeypatch) -> list[Plan]:
    import featmap.run.plan as plan_module

    plans, build = [], plan_module.Plan.build.__func__

    def spy(cls, *args, **kwargs):
        plans.append(build(cls, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(plan_module.Plan, "build", classmethod(spy))
    return plans


def test_prepare_and_run_execute_the_same_cells_and_a_warm_rerun_computes_nothing(tiny, monkeypatch, one_thread):
    import featmap.maps.learned as learned
    import featmap.run.cells as cells
    import featmap.run.chapter as chapter
    from featmap.core.distributed import Context
    from featmap.run.distributed import prepare_chapter

    plans = _spy_plans(monkeypatch)
    summary = prepare_chapter(tiny, Context())
    first = chapter.run_chapter(tiny)
    assert [c.name for c in plans[0].cells] == [c.name for c in plans[1].cells]
    assert [[m.name for m in c.mappings] for c in plans[0].cells] == [[m.name for m in c.mappings]
                                                                      for c in plans[1].cells]
    closed = {f"{c.name}/{m.name}" for c, m in plans[0].fits() if m.name == "linear"}
    assert closed <= set(summary["fits"]) and len(summary["trained_maps"]) == 2  # mlp at blocks.6, two edits
    assert first.extracted == 0  # prepare extracted everything

    trained, tails, imagers = [], [], []
    monkeypatch.setattr(learned, "train_map", lambda *a, **k: trained.append(1) or (_ for _ in ()).throw(
        AssertionError("a warm rerun trained a map")))
    real_tail, real_imager = cells.classifier_tail, cells.ImageScorer
    monkeypatch.setattr(cells, "classifier_tail", lambda *a: tails.append(1) or real_tail(*a))
    monkeypatch.setattr(cells, "ImageScorer", lambda *a, **k: imagers.append(1) or real_imager(*a, **k))
    second = chapter.run_chapter(tiny)
    assert (second.extracted, second.timings["scores_computed"], len(trained), len(tails), len(imagers)) == \
        (0, 0, 0, 0, 0)
    assert second.timings["scores_cached"] == first.timings["scores_cached"] + first.timings["scores_computed"]
    pd.testing.assert_frame_equal(first.table, second.table)
    assert first.reconstructions.keys() == second.reconstructions.keys()


def test_a_changed_input_is_recomputed_not_served_stale(tiny, one_thread):
    import dataclasses

    from featmap.run.chapter import run_chapter

    changed = run_chapter(dataclasses.replace(tiny, bootstrap=60), write=False)
    assert changed.timings["scores_computed"] > 0  # the intervals depend on the resamples: nothing reused


def test_prepare_runs_the_layers_chapter(photo_dir, tmp_path, one_thread):
    from featmap.__main__ import main

    args = ["prepare", "--chapter", "layers", "-p", "images", str(photo_dir), "-p", "cache_dir", str(tmp_path),
            "-y", "layers: [blocks.4, blocks.6]", "-y", "manipulations: [mirror_h, grayscale]", "-p", "bootstrap",
            "20", "--summary", str(tmp_path / "s.json")]
    assert main(args) == 0
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["chapter"] == "layers" and summary["closed_form_fits"] == 2 * 2 * 1  # edits x layers x linear


def test_poisoned_test_features_change_no_fit_no_choice_and_no_stopping(tiny, tmp_path, one_thread):
    """Leakage check: replace every test photo's cached features with noise; the fitted maps, the chosen ridge
    strength, the normaliser and early stopping (all decided on training and validation photos) do not move, while
    the test scores do."""
    import dataclasses
    import shutil

    import numpy as np

    from featmap.features.store import FeatureCache
    from featmap.run.chapter import run_chapter
    from featmap.run.prepare import prepare

    clean = run_chapter(dataclasses.replace(tiny, chapter="clean"), write=False)
    poisoned_dir = tmp_path / "poisoned"
    shutil.copytree(tiny.cache_dir, poisoned_dir)
    for folder in ("scores", "maps"):  # nothing cached downstream of the features: everything is refit
        shutil.rmtree(poisoned_dir / folder, ignore_errors=True)
    config = dataclasses.replace(tiny, chapter="poisoned", cache_dir=str(poisoned_dir))
    _, split, store, manipulations = prepare(config)
    cache, rng = FeatureCache(poisoned_dir), np.random.default_rng(0)
    for view in split.views("test", config.train_views):
        for manip in [None, *manipulations]:
            for layer, spec in store.backbone.specs.items():
                cache.put(store.key(view, manip, layer), rng.normal(size=spec.shape).astype(np.float16))
    poisoned = run_chapter(config, write=False)

    def rows(table, metrics):
        return table[table.metric.isin(metrics)].set_index(["manipulation", "layer", "spatial", "mapping",
                                                            "metric"])["value"].sort_index()

    decided = ["ridge_alpha", "ridge_lambda", "epochs", "best_val_loss", "val_cos_mean", "n_params"]
    pd.testing.assert_series_equal(rows(clean.table, decided), rows(poisoned.table, decided))
    scored = rows(clean.table, ["cos_mean"]) - rows(poisoned.table, ["cos_mean"])
    assert scored.abs().max() > 0.1  # the test scores did see the poison


def test_best_and_worst_photos_come_from_the_per_photo_scores(tiny, one_thread):
    from featmap.report.panels import best_and_worst
    from featmap.report.plots import plot_best_worst
    from featmap.run.chapter import run_chapter

    result = run_chapter(tiny, write=False)
    shown = best_and_worst(result, "linear")
    assert [label for label, _ in shown] == [f"{m}: {w}" for m in tiny.manipulations for w in ("best", "worst")]
    for manip in tiny.manipulations:
        spatial = "none"
        scores = result.per_photo[manip, "blocks.6", spatial, "linear"]["cos_mean"]
        best = next(p for label, p in shown if label == f"{manip}: best")
        worst = next(p for label, p in shown if label == f"{manip}: worst")
        assert f"{scores.max():.2f}" in best[1][0] and f"{scores.min():.2f}" in worst[1][0]
        assert best[0][1].shape == best[1][1].shape and best[0][1].dtype == np.uint8
    assert len(plot_best_worst(shown).axes) == 4 * len(tiny.manipulations)
