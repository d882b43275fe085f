"""The claims module on planted tables: every verdict follows from the numbers it is given."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from featmap.core.table import COLUMNS, row
from featmap.report.claims import (
    claim_layer_trends,
    claim_learnable,
    claim_linear_close,
    family_verdicts,
    overall,
    read_all,
    verdict,
)
from featmap.run.chapter import gap_rows


def _row(family, manip, mapping, metric, value, ci=None, spatial=None, layer="blocks.6", backbone="b"):
    spatial = spatial or ("applied" if family == "geometric" else "none")
    base = {"family": family, "manipulation": manip, "backbone": backbone, "layer": layer, "mapping": mapping,
            "spatial": spatial}
    return row(base, metric, value, 10, ci or (value - 0.01, value + 0.01))


def test_verdict_thresholds():
    assert verdict(1.0) == "holds"
    assert verdict(0.5) == "holds partly" and verdict(0.49) == "does not hold"
    assert verdict(float("nan")) == "does not hold"


def test_learnable_uses_the_interval_against_identity():
    rows = [
        _row("photometric", "grayscale", "identity", "cos_mean", 0.80),
        _row("photometric", "grayscale", "linear", "cos_mean", 0.90, (0.85, 0.95)),  # beats
        _row("photometric", "noise_40", "identity", "cos_mean", 0.80),
        _row("photometric", "noise_40", "linear", "cos_mean", 0.82, (0.78, 0.86)),  # interval reaches identity
        _row("photometric", "noise_40", "mlp", "cos_mean", 0.90, (0.88, 0.92)),
        # a raw-grid geometric row must be ignored (only the permuted comparison counts)
        _row("geometric", "rotation_90", "linear", "cos_mean", 0.1, spatial="none"),
        _row("geometric", "rotation_90", "identity", "cos_mean", 0.60),
        _row("geometric", "rotation_90", "linear", "cos_mean", 0.70, (0.65, 0.75)),
    ]
    cases = claim_learnable(pd.DataFrame(rows, columns=COLUMNS))
    by = cases.set_index("manipulation")
    assert bool(by.loc["grayscale", "beats_identity"]) and not bool(by.loc["noise_40", "beats_identity"])
    assert by.loc["noise_40", "best_map"] == "mlp" and bool(by.loc["noise_40", "best_beats_identity"])
    assert by.loc["rotation_90", "value"] == pytest.approx(0.70)
    fam = family_verdicts(cases, "beats_identity").set_index("family")
    assert fam.loc["photometric", "verdict"] == "holds partly" and fam.loc["geometric", "verdict"] == "holds"
    assert family_verdicts(cases, "best_beats_identity").set_index("family").loc["photometric", "verdict"] == "holds"


def test_gap_rows_are_paired_differences_and_feed_the_closeness_claim():
    rng = np.random.default_rng(0)
    common = rng.normal(0.7, 0.1, 40)  # shared per-photo difficulty: pairing removes it from the interval
    per_sample = {"linear": {"cos_mean": common + 0.01},
                  "transformer": {"cos_mean": common + 0.02},
                  "transformer_pe": {"cos_mean": common - 0.05}}
    base = {"family": "photometric", "manipulation": "grayscale", "backbone": "b", "layer": "blocks.6",
            "spatial": "none"}
    rows = gap_rows(base, per_sample, 200, 0)
    gaps = {r["metric"]: r for r in rows}
    assert gaps["cos_mean_gap_transformer"]["value"] == pytest.approx(-0.01)
    assert gaps["cos_mean_gap_transformer_pe"]["value"] == pytest.approx(0.06)
    # a constant difference has a zero-width paired interval, although the per-map spread is 0.1
    assert gaps["cos_mean_gap_transformer"]["ci_high"] - gaps["cos_mean_gap_transformer"]["ci_low"] < 1e-9
    assert gap_rows(base, {"transformer": per_sample["transformer"]}, 10, 0) == []
    table = pd.DataFrame(rows, columns=COLUMNS)
    close = claim_linear_close(table, tolerance=0.02)
    assert close.loc[0, "versus"] == "transformer" and bool(close.loc[0, "close"])
    assert not bool(claim_linear_close(table, tolerance=0.005).loc[0, "close"])


def test_layer_trends_verdicts():
    rows = []
    for depth, layer in enumerate(["l0", "l1", "l2", "l3"]):
        for manip in ("a", "b"):
            rows.append(_row("photometric", manip, "linear", "bias_share", 0.1 * depth, layer=layer))
            rows.append(_row("photometric", manip, "linear", "erank_frac", [0.5, 0.2, 0.6, 0.3][depth], layer=layer))
    trends = claim_layer_trends(pd.DataFrame(rows, columns=COLUMNS), metrics=("bias_share", "erank_frac"))
    by = trends.set_index("metric")
    assert by.loc["bias_share", "spearman_with_depth"] == pytest.approx(1.0)
    assert by.loc["bias_share", "verdict"] == "holds"
    assert by.loc["erank_frac", "verdict"] == "does not hold"


def test_read_all_needs_a_family_table():
    with pytest.raises(ValueError, match="run the family chapters"):
        read_all({"layers": pd.DataFrame([_row("photometric", "a", "linear", "cos_mean", 1.0)], columns=COLUMNS)})


def test_overall_takes_the_weakest_family_and_ignores_the_random_control():
    fam1 = pd.DataFrame({"family": ["photometric", "masking"], "cases": [4, 4], "agree": [4, 2],
                         "share": [1.0, 0.5], "verdict": ["holds", "holds partly"]})
    fam2 = fam1.assign(metric="cos_mean", verdict=["holds", "holds"], agree=[4, 4], share=[1.0, 1.0])
    trends = pd.DataFrame({"backbone": ["b", "b:random"], "metric": ["bias_share", "bias_share"],
                           "first_layer": ["l0", "l0"], "first": [0.1, 0.5], "last_layer": ["l3", "l3"],
                           "last": [0.4, 0.5], "spearman_with_depth": [1.0, 0.0],
                           "verdict": ["holds", "does not hold"]})
    trends = pd.concat([trends, trends.iloc[[0]].assign(metric="erank_frac", spearman_with_depth=0.5,
                                                        verdict="holds partly"),
                        trends.iloc[[0]].assign(metric="delta_erank_frac", spearman_with_depth=0.1,
                                                verdict="does not hold")], ignore_index=True)
    table = overall({1: fam1, 2: fam2}, trends).set_index("claim")
    # claim 3: weight vs bias holds (bias_share), effective rank partly (its best metric): the weaker is partly
    assert list(table["verdict"]) == ["holds partly", "holds", "holds partly"]
    assert "masking: 2 of 4 cases (holds partly)" in table.loc[1, "measured"]
    assert "b:random" not in table.loc[3, "measured"] and "rho +1.00" in table.loc[3, "measured"]
    assert "effective rank: erank_frac" in table.loc[3, "measured"]
    empty = overall({}, None).set_index("claim")
    assert list(empty["verdict"]) == ["not measured"] * 3


def test_geometry_by_family_averages_linear_rows_and_ranks_the_family():
    from featmap.report.findings import geometry_by_family, geometry_findings

    rows = [_row("semantic", "a", "linear", "bias_share", 0.4), _row("semantic", "b", "linear", "bias_share", 0.2),
            _row("masking", "m", "linear", "bias_share", 0.1), _row("masking", "m", "identity", "bias_share", 9.0),
            _row("geometric", "r", "linear", "bias_share", 5.0, spatial="none"),  # raw grid: excluded
            _row("geometric", "r", "linear", "bias_share", 0.5)]
    wide = geometry_by_family([pd.DataFrame(rows, columns=COLUMNS)], metrics=("bias_share",))
    assert wide.loc[("blocks.6", "semantic"), "bias_share"] == pytest.approx(0.3)
    assert wide.loc[("blocks.6", "geometric"), "bias_share"] == pytest.approx(0.5)
    text = geometry_findings(wide, "semantic")
    assert "semantic 0.300, rank 2 of 3" in text and "geometric 0.500" in text
