from pathlib import Path

import numpy as np
import pandas as pd

from featmap.core.table import COLUMNS
from featmap.report.trends import layer_trends
from featmap.run.config import RunConfig
from featmap.run.layers import run_layers, stage_names

BOOK = Path(__file__).resolve().parent.parent / "book"


def test_stage_names_are_the_models_feature_info():
    assert stage_names("tf_efficientnet_lite0") == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]


def test_layers_table_for_trained_and_random_weights(photo_dir):
    config = RunConfig(chapter="layers", manipulations=["rotation_90", "grayscale"], layers=["blocks.4", "blocks.6"],
                       images=str(photo_dir), train_views=1, bootstrap=50, mappings=["identity", "linear"])
    table = run_layers(config, control="random", ranks=(1, 8, 500))
    assert list(table.columns) == COLUMNS
    assert set(table.backbone) == {"tf_efficientnet_lite0", "tf_efficientnet_lite0:random"}
    assert set(table[table.manipulation == "rotation_90"].spatial) == {"applied"}
    lin = table[table.mapping == "linear"].pivot_table(index=["backbone", "layer", "manipulation"], columns="metric",
                                                       values="value")
    from featmap.maps.stats import RIDGE_GRID

    assert set(lin.ridge_alpha) <= set(RIDGE_GRID)  # chosen from the grid on validation photos, flagged at its edge
    assert (lin.alpha_at_edge == (lin.ridge_alpha == max(RIDGE_GRID))).all()
    hw = {"blocks.4": 14 * 14, "blocks.6": 7 * 7}
    n_train = lin.reset_index().apply(lambda r: r["n_train_positions"] / hw[r["layer"]], axis=1)
    assert len(set(n_train)) == 1 and float(n_train.iloc[0]).is_integer()  # every fit saw the same training photos
    # the noise floor is a spread over shuffles: its mean lies in its [min, max] interval, and real fits differ
    floor = table[(table.metric == "delta_erank_floor_frac")]
    assert ((floor.ci_low <= floor.value + 1e-12) & (floor.value <= floor.ci_high + 1e-12)).all()
    # a real effect, not a tautology: with trained weights the linear map beats identity on grayscale at blocks.4
    cos = table[(table.metric == "cos_mean") & (table.backbone == "tf_efficientnet_lite0") & (table.layer == "blocks.4")
                & (table.manipulation == "grayscale")].set_index("mapping")["value"]
    assert cos["linear"] > cos["identity"] + 0.005
    # the fixed-alpha fits sit beside auto
    assert {"linear_alpha0", "linear_alpha1"} <= set(table.mapping)
    ranks = {m for m in table.mapping if m.startswith("linear_rank")}
    assert ranks == {"linear_rank1", "linear_rank8"}  # k >= C is not a truncation
    align = table[(table.mapping == "grid_op") & (table.metric == "align_cos_plain")]
    assert set(align.manipulation) == {"rotation_90"}  # grid alignment is measured for geometric edits only
    trends = layer_trends(table, ["bias_share", "erank_frac"])
    assert len(trends) == 4 and set(trends.first_layer) == {"blocks.4"} and set(trends.last_layer) == {"blocks.6"}


def test_papermill_runs_the_layers_chapter(small_book):
    """The layers chapter through papermill (the shared small book: blocks.4 and blocks.6, one geometric and one
    masking edit) writes its table with finite geometry."""
    assert "layers" not in small_book.failed, small_book.failed.get("layers")
    table = pd.read_csv(small_book.results / "layers.csv")
    assert set(table.layer) == {"blocks.4", "blocks.6"} and set(table.family) == {"geometric", "masking"}
    assert np.isfinite(table[table.metric == "delta_erank_frac"].value).all()
