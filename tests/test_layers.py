from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm

from featmap.core.table import COLUMNS, results_dir
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
    assert ((lin.wx_share >= 0) & (lin.bias_share >= 0) & (lin.cos_wx_full <= 1 + 1e-9)).all()
    assert ((lin.erank_frac > 0) & (lin.erank_frac <= 1 + 1e-9)).all()
    assert (lin.erank_energy <= lin.erank + 1e-9).all()  # squaring concentrates the spectrum
    ranks = {m for m in table.mapping if m.startswith("linear_rank")}
    assert ranks == {"linear_rank1", "linear_rank8"}  # k >= C is not a truncation
    assert (lin.n_train_positions > 0).all()
    trends = layer_trends(table, ["bias_share", "erank_frac"])
    assert len(trends) == 4 and set(trends.first_layer) == {"blocks.4"} and set(trends.last_layer) == {"blocks.6"}


def test_papermill_runs_the_layers_chapter(tmp_path, photo_dir):
    pm.execute_notebook(str(BOOK / "layers.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                        parameters={"images": str(photo_dir), "layers": ["blocks.4", "blocks.6"], "max_images": None,
                                    "manipulations": ["mirror_h", "mask_big_square_center"], "bootstrap": 50},
                        progress_bar=False)
    table = pd.read_csv(results_dir() / "layers.csv")
    assert set(table.layer) == {"blocks.4", "blocks.6"} and set(table.family) == {"geometric", "masking"}
    assert np.isfinite(table[table.metric == "delta_erank_frac"].value).all()
