"""featmap.report.verdicts on planted tables: every outcome is known before the rule runs, and each test fails
when the rule it guards goes back to the old, unpaired or two-outcome form."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import featmap.report.verdicts as v

HOLDS, FAILS, INCONCLUSIVE = v.HOLDS, v.FAILS, v.INCONCLUSIVE
COLUMNS = ["family", "manipulation", "backbone", "layer", "mapping", "spatial", "metric", "value", "n", "ci_low",
           "ci_high"]


def _row(manip, mapping, metric, value, ci=(np.nan, np.nan), family="photometric", spatial=None, layer="blocks.6",
         backbone="lite0", n=48):
    spatial = spatial or ("applied" if family == "geometric" else "none")
    return {"family": family, "manipulation": manip, "backbone": backbone, "layer": layer, "mapping": mapping,
            "spatial": spatial, "metric": metric, "value": value, "n": n, "ci_low": ci[0], "ci_high": ci[1]}


def _table(rows):
    return pd.DataFrame(rows, columns=COLUMNS)


def _boot(values, seed=0, n_boot=2000):
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))
    means = values[idx].mean(1)
    return float(values.mean()), (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _by(cases, col="manipulation"):
    return cases.set_index(col)


# -- the rules themselves ------------------------------------------------------------------------------------

def test_superiority_and_non_inferiority_have_three_outcomes():
    assert v.superiority(0.01, 0.05, 0.03, 0.02) == HOLDS
    assert v.superiority(0.001, 0.003, 0.002, 0.02) == FAILS  # real but below the minimum effect
    assert v.superiority(-0.07, -0.03, -0.05, 0.02) == FAILS
    assert v.superiority(-0.01, 0.07, 0.03, 0.02) == INCONCLUSIVE
    assert v.superiority(0.001, 0.05, 0.01, 0.02) == INCONCLUSIVE  # real, point below the minimum, not ruled out
    assert v.superiority(np.nan, np.nan, 0.03, 0.02) == INCONCLUSIVE
    assert v.non_inferiority(-0.01, 0.01, 0.02) == HOLDS
    assert v.non_inferiority(-0.2, -0.1, 0.02) == FAILS
    assert v.non_inferiority(-0.11, 0.09, 0.05) == INCONCLUSIVE
    assert v.non_inferiority(np.nan, np.nan, 0.05) == INCONCLUSIVE
    got = v.non_inferiority(pd.Series([-0.01, -0.2, -0.11], index=list("abc")),
                            pd.Series([0.01, -0.1, 0.09], index=list("abc")), 0.05)
    assert got.to_dict() == {"a": HOLDS, "b": FAILS, "c": INCONCLUSIVE}


# -- claim 1 ------------------------------------------------------------------------------------------------

def test_a_paired_gain_that_the_unpaired_rule_misses_holds():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.85, 0.10, 48)  # per-photo difficulty, shared by both maps
    identity = difficulty
    linear = difficulty + 0.02 + rng.normal(0, 0.004, 48)
    id_mean, id_ci = _boot(identity)
    lin_mean, lin_ci = _boot(linear)
    gap, gap_ci = _boot(linear - identity)
    assert lin_ci[0] < id_mean  # the old rule (map's interval above identity's mean) misses this gain
    rows = [_row("grayscale", "identity", "cos_mean", id_mean, id_ci),
            _row("grayscale", "linear", "cos_mean", lin_mean, lin_ci),
            _row("grayscale", "linear", "cos_mean_gap_identity", gap, gap_ci)]
    cases, controls = v.claim_learnable(_table(rows))
    case = cases.iloc[0]
    assert len(cases) == 1 and controls.empty
    assert case["outcome"] == HOLDS
    assert case["min_effect"] == pytest.approx(0.1 * (1 - id_mean)) and case["gain"] >= case["min_effect"]


def test_learnable_small_worse_underpowered_and_missing():
    rows = []
    for manip, gap, ci in [("tiny", 0.002, (0.001, 0.003)), ("worse", -0.05, (-0.07, -0.03)),
                           ("wide", 0.03, (-0.01, 0.07)), ("clear", 0.05, (0.04, 0.06))]:
        rows += [_row(manip, "identity", "cos_mean", 0.8, (0.75, 0.85)),
                 _row(manip, "linear", "cos_mean_gap_identity", gap, ci)]
    rows.append(_row("unfitted", "identity", "cos_mean", 0.8))
    # lower is better: rel_err falls by 0.1 from identity's 0.5 (headroom 0.5, minimum 0.05)
    rows += [_row("noise_40", "identity", "rel_err", 0.5),
             _row("noise_40", "linear", "rel_err_gap_identity", -0.1, (-0.12, -0.08))]
    cases = _by(v.claim_learnable(_table(rows)).cases)
    assert cases.loc["tiny", "outcome"] == FAILS  # significant, but under the 10%-of-headroom minimum
    assert cases.loc["worse", "outcome"] == FAILS
    assert cases.loc["wide", "outcome"] == INCONCLUSIVE
    assert cases.loc["clear", "outcome"] == HOLDS
    assert cases.loc["unfitted", "outcome"] == INCONCLUSIVE
    assert "no cos_mean_gap_identity" in cases.loc["unfitted", "note"]
    rel = _by(v.claim_learnable(_table(rows), metric="rel_err").cases)
    assert rel.loc["noise_40", "outcome"] == HOLDS and rel.loc["noise_40", "gain"] == pytest.approx(0.1)


def test_partner_edits_are_controls_not_cases():
    rows = []
    for manip in ("background_swap", "object_paste", "object_recolour_red"):
        rows += [_row(manip, "identity", "cos_mean", 0.6, family="semantic"),
                 _row(manip, "linear", "cos_mean_gap_identity", -0.01, (-0.02, 0.0), family="semantic")]
    cases, controls = v.claim_learnable(_table(rows))
    assert cases["manipulation"].tolist() == ["object_recolour_red"]
    assert sorted(controls["manipulation"]) == ["background_swap", "object_paste"]
    assert (controls["outcome"] == FAILS).all()  # what "not learnable" looks like
    assert list(controls.columns) == list(cases.columns)
    close = v.claim_linear_close(_table([_row(m, "linear", "cos_mean_gap_transformer", 0.0, (-0.01, 0.01),
                                              family="semantic") for m in ("background_swap", "object_blur")]))
    assert close.cases["manipulation"].tolist() == ["object_blur"] and len(close.controls) == 1


def test_best_map_is_chosen_on_validation_never_on_test():
    rows = [_row("hue_shift_60", "identity", "cos_mean", 0.80)]
    for mapping, val, test, gap in [("mlp", 0.90, 0.84, 0.04), ("cnn", 0.85, 0.88, 0.08), ("linear", 0.86, 0.83, 0.03)]:
        rows += [_row("hue_shift_60", mapping, "val_cos_mean", val),
                 _row("hue_shift_60", mapping, "cos_mean", test),
                 _row("hue_shift_60", mapping, "cos_mean_gap_identity", gap, (gap - 0.01, gap + 0.01))]
    rows.append(_row("hue_shift_60", "identity", "val_cos_mean", 0.95))  # identity is no candidate
    case = v.claim_learnable(_table(rows)).cases.iloc[0]
    assert case["best_map_val"] == "mlp" and case["best_test_value"] == pytest.approx(0.84)
    assert case["best_gain"] == pytest.approx(0.04) and case["best_outcome"] == HOLDS and case["best_note"] == ""
    no_val = _table([r for r in rows if r["metric"] != "val_cos_mean"])
    case = v.claim_learnable(no_val).cases.iloc[0]
    assert pd.isna(case["best_map_val"]) and "no validation rows" in case["best_note"]
    assert case["best_outcome"] == INCONCLUSIVE
    separate = _table([{**r, "metric": "cos_mean"} for r in rows if r["metric"] == "val_cos_mean"])
    case = v.claim_learnable(no_val, validation=separate).cases.iloc[0]
    assert case["best_map_val"] == "mlp"


def test_backbones_and_spatial_modes_never_mix():
    rows = []
    for backbone, ident, gap in [("lite0", 0.8, 0.05), ("resnet50", 0.9, 0.001)]:
        rows += [_row("grayscale", "identity", "cos_mean", ident, backbone=backbone),
                 _row("grayscale", "linear", "cos_mean_gap_identity", gap, (gap - 0.0005, gap + 0.0005),
                      backbone=backbone)]
    for spatial, ident, gap in [("applied", 0.7, 0.1), ("none", 0.2, -0.1)]:
        rows += [_row("rotation_90", "identity", "cos_mean", ident, family="geometric", spatial=spatial),
                 _row("rotation_90", "linear", "cos_mean_gap_identity", gap, (gap - 0.01, gap + 0.01),
                      family="geometric", spatial=spatial)]
    cases = v.claim_learnable(_table(rows)).cases.set_index(["manipulation", "backbone", "spatial"])
    assert len(cases) == 3  # the raw-grid rotation is not a comparable case
    assert cases.loc[("grayscale", "lite0", "none"), "outcome"] == HOLDS
    assert cases.loc[("grayscale", "resnet50", "none"), "outcome"] == FAILS  # 0.001 < 10% of 0.1 headroom
    assert cases.loc[("grayscale", "resnet50", "none"), "identity"] == pytest.approx(0.9)
    every = v.claim_learnable(_table(rows), keep=None).cases.set_index(["manipulation", "spatial"])
    assert every.loc[("rotation_90", "none"), "identity"] == pytest.approx(0.2)
    assert every.loc[("rotation_90", "applied"), "identity"] == pytest.approx(0.7)
    assert every.loc[("rotation_90", "none"), "outcome"] == FAILS
    with pytest.raises(ValueError, match="share a key"):
        v.claim_learnable(_table(rows + [rows[0]]))


# -- claim 2 -------------------------------------------------------------------------------------------------

def test_linear_close_is_a_non_inferiority_test():
    rows = [
        # ~48 photos of top1_agree: a +-0.1 interval cannot tell a 0.05 loss from none
        _row("grayscale", "linear", "top1_agree_gap_transformer", -0.01, (-0.11, 0.09)),
        _row("grayscale", "linear", "top1_agree_gap_transformer_pe", 0.02, (-0.05, 0.09)),
        _row("noise_40", "linear", "top1_agree_gap_transformer", -0.2, (-0.27, -0.13)),
        _row("hue_shift_60", "linear", "top1_agree_gap_transformer", -0.01, (-0.03, 0.01)),
        # hardest = lower ci_low, not lower point gap
        _row("hue_shift_60", "linear", "top1_agree_gap_transformer_pe", -0.02, (-0.025, -0.015)),
        _row("hue_shift_60", "transformer", "steps", 240), _row("hue_shift_60", "transformer", "train_loss", 0.3),
    ]
    cases = _by(v.claim_linear_close(_table(rows), "top1_agree", tolerance=0.05).cases)
    assert cases.loc["grayscale", "outcome"] == INCONCLUSIVE and cases.loc["grayscale", "versus"] == "transformer"
    assert cases.loc["noise_40", "outcome"] == FAILS
    assert cases.loc["hue_shift_60", "outcome"] == HOLDS and cases.loc["hue_shift_60", "versus"] == "transformer"
    assert cases.loc["hue_shift_60", "compared"] == "transformer,transformer_pe"
    assert cases.loc["hue_shift_60", "transformer_steps"] == 240
    assert cases.loc["hue_shift_60", "transformer_train_loss"] == pytest.approx(0.3)
    # lower is better: st_lpips linear - global = +0.2 means linear is worse
    lp = v.claim_linear_close(_table([_row("grayscale", "linear", "st_lpips_gap_transformer", 0.2, (0.15, 0.25))]),
                              "st_lpips", tolerance=0.05).cases.iloc[0]
    assert lp["outcome"] == FAILS and lp["gap"] == pytest.approx(-0.2)


# -- counting ------------------------------------------------------------------------------------------------

def test_count_outcomes_rules():
    cases = pd.DataFrame({"family": ["a", "a", "b", "b", "b", "c"],
                          "outcome": [HOLDS, HOLDS, HOLDS, INCONCLUSIVE, HOLDS, FAILS]})
    got = v.count_outcomes(cases).set_index("family")
    assert got.loc["a", "verdict"] == HOLDS and got.loc["b", "verdict"] == INCONCLUSIVE
    assert got.loc["c", "verdict"] == FAILS and got.loc["overall", "verdict"] == FAILS
    assert got.loc["overall", [HOLDS, FAILS, INCONCLUSIVE]].tolist() == [4, 1, 1]
    assert v.count_outcomes(cases, max_inconclusive_share=0.34).set_index("family").loc["b", "verdict"] == HOLDS
    most = v.count_outcomes(cases, rule="most").set_index("family")
    assert most.loc["overall", "verdict"] == HOLDS and most.loc["c", "verdict"] == FAILS
    empty = v.count_outcomes(cases.iloc[:0])
    assert empty["verdict"].tolist() == [INCONCLUSIVE] and empty["cases"].tolist() == [0]
    with pytest.raises(ValueError, match="not outcomes"):
        v.count_outcomes(pd.DataFrame({"family": ["a"], "outcome": [True]}))


# -- claim 3 -------------------------------------------------------------------------------------------------

def test_geometry_flags_alpha_at_the_grid_edge_and_places_the_random_control_beside():
    rows = []
    for manip, alpha in [("mirror_h", max(v.RIDGE_GRID)), ("grayscale", 1.0), ("hue_shift_60", 0.0)]:
        family = "geometric" if manip == "mirror_h" else "photometric"
        for backbone, share in [("lite0", 0.4), ("lite0:random", 0.9)]:
            rows += [_row(manip, "linear", "ridge_alpha", alpha, family=family, backbone=backbone),
                     _row(manip, "linear", "delta_bias_share", share, (share - 0.1, share + 0.1), family=family,
                          backbone=backbone),
                     _row(manip, "linear_alpha0", "delta_bias_share", share / 2, family=family, backbone=backbone)]
    rows.append(_row("grayscale", "linear_rank4", "delta_bias_share", 0.1))  # not a geometry mapping
    geo = v.geometry_table(_table(rows), metrics=["delta_bias_share"])
    auto = geo[geo["alpha_setting"] == "auto"].set_index("manipulation")
    assert bool(auto.loc["mirror_h", "edge_alpha"]) and auto.loc["mirror_h", "edge_side"] == "high"
    assert not auto.loc["grayscale", "edge_alpha"] and not auto.loc["hue_shift_60", "edge_alpha"]  # 0: no low edge
    assert (auto["backbone"] == "lite0").all() and auto["random_value"].tolist() == pytest.approx([0.9] * 3)
    assert auto.loc["mirror_h", "ci_low"] == pytest.approx(0.3) and bool(auto.loc["mirror_h", "random_edge_alpha"])
    fixed = geo[geo["alpha_setting"] == "0"]
    assert len(fixed) == 3 and not fixed["edge_alpha"].any() and (fixed["alpha"] == 0).all()
    assert "linear_rank4" not in set(geo["mapping"]) and len(geo) == 6
    # a grid without 0: its smallest value is an edge too
    low = v.geometry_table(_table(rows), metrics=["delta_bias_share"], grid=(1.0, 10.0, 1000.0))
    low = low[low["alpha_setting"] == "auto"].set_index("manipulation")
    assert low.loc["grayscale", "edge_side"] == "low" and not low.loc["mirror_h", "edge_alpha"]
    summary = v.geometry_by_family(geo)
    assert summary.set_index(["family", "alpha_setting"]).loc[("geometric", "auto"), "edge_alpha_cases"] == 1


def _gaps(manip, per_layer, family="photometric", spatial=None, backbone="lite0"):
    return [_row(manip, "linear", f"cos_mean_gap_{g}", gap, (gap - w, gap + w), family=family, spatial=spatial,
                 layer=layer, backbone=backbone)
            for layer, g, gap, w in per_layer]


def test_depth_gap_trend_three_outcomes():
    L = ["blocks.2", "blocks.4", "blocks.6"]
    rows = (_gaps("rising", [(L[0], "transformer", -0.10, 0.02), (L[1], "transformer", -0.05, 0.02),
                             (L[2], "transformer", 0.0, 0.02), (L[2], "transformer_pe", 0.01, 0.04)])
            + _gaps("falling", [(L[0], "transformer", 0.0, 0.01), (L[1], "transformer", -0.05, 0.01),
                                (L[2], "transformer", -0.10, 0.01)])
            + _gaps("overlap", [(L[0], "transformer", -0.05, 0.03), (L[1], "transformer", -0.04, 0.03),
                                (L[2], "transformer", -0.02, 0.03)])
            + _gaps("reversal", [(L[0], "transformer", -0.10, 0.01), (L[1], "transformer", 0.05, 0.01),
                                 (L[2], "transformer", 0.0, 0.01)])
            + _gaps("two_layers", [(L[0], "transformer", -0.10, 0.01), (L[2], "transformer", 0.0, 0.01)]))
    table = _table(rows[::-1])  # rows in any order: layer_order decides depth
    per, trend = v.depth_gap_trend(table, layer_order=L)
    t = _by(trend)
    assert t.loc["rising", "outcome"] == HOLDS and t.loc["rising", "diff_low"] == pytest.approx(0.05)
    assert t.loc["falling", "outcome"] == FAILS
    assert t.loc["overlap", "outcome"] == INCONCLUSIVE
    assert t.loc["reversal", "outcome"] == INCONCLUSIVE and bool(t.loc["reversal", "reversal"])
    assert t.loc["two_layers", "outcome"] == INCONCLUSIVE and t.loc["two_layers", "n_layers"] == 2
    deep = per[(per["manipulation"] == "rising") & (per["layer"] == L[2])].iloc[0]
    assert deep["versus"] == "transformer_pe"  # its ci_low -0.03 is the lower: the hardest comparison
    assert v.depth_gap_trend(table, layer_order=L, min_increase=0.2).trend.set_index("manipulation").loc[
        "rising", "outcome"] == FAILS  # the data rule out a rise of 0.2


def test_depth_gap_trend_drops_misaligned_stages_of_applied_rows_only():
    L = ["blocks.0", "blocks.2", "blocks.4", "blocks.6"]
    per_layer = [(L[0], "transformer", 0.5, 0.01), (L[1], "transformer", -0.1, 0.01),
                 (L[2], "transformer", -0.05, 0.01), (L[3], "transformer", 0.0, 0.01)]
    rows = _gaps("mirror_h", per_layer, family="geometric") + _gaps("grayscale", per_layer)
    rows += _gaps("mirror_h", per_layer, family="geometric", backbone="lite0:random")
    t = v.depth_gap_trend(_table(rows), misaligned=[("lite0", "blocks.0")]).trend.set_index(["manipulation",
                                                                                                "backbone"])
    assert t.loc[("mirror_h", "lite0"), "outcome"] == HOLDS and t.loc[("mirror_h", "lite0"), "n_layers"] == 3
    assert t.loc[("grayscale", "lite0"), "outcome"] == FAILS  # no grid operation: blocks.0 stays
    assert t.loc[("mirror_h", "lite0:random"), "outcome"] == FAILS  # another backbone, its own stages
