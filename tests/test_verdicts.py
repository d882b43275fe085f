"""featmap.report.verdicts on planted tables: every outcome is known before the rule runs, and each test fails
when the rule it guards goes back to the old, unpaired or two-outcome form."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import featmap.report.geometry as geometry
import featmap.report.rules as rules
import featmap.report.verdicts as v

HOLDS, FAILS, INCONCLUSIVE = rules.HOLDS, rules.FAILS, rules.INCONCLUSIVE
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
    assert rules.superiority(0.01, 0.05, 0.03, 0.02) == HOLDS
    assert rules.superiority(0.001, 0.003, 0.002, 0.02) == FAILS  # real but below the minimum effect
    assert rules.superiority(-0.07, -0.03, -0.05, 0.02) == FAILS
    assert rules.superiority(-0.01, 0.07, 0.03, 0.02) == INCONCLUSIVE
    assert rules.superiority(0.001, 0.05, 0.01, 0.02) == INCONCLUSIVE  # real, point below the minimum, not ruled out
    assert rules.superiority(np.nan, np.nan, 0.03, 0.02) == INCONCLUSIVE
    assert rules.non_inferiority(-0.01, 0.01, 0.02) == HOLDS
    assert rules.non_inferiority(-0.2, -0.1, 0.02) == FAILS
    assert rules.non_inferiority(-0.11, 0.09, 0.05) == INCONCLUSIVE
    assert rules.non_inferiority(np.nan, np.nan, 0.05) == INCONCLUSIVE
    got = rules.non_inferiority(pd.Series([-0.01, -0.2, -0.11], index=list("abc")),
                            pd.Series([0.01, -0.1, 0.09], index=list("abc")), 0.05)
    assert got.to_dict() == {"a": HOLDS, "b": FAILS, "c": INCONCLUSIVE}


# -- claim 1: feasibility ----------------------------------------------------------------------------------

def _feasible(manip, floor, maps, family="photometric", floor_val=None, local=None, metric="cos_mean", **kw):
    """Rows of one case: the floor (identity) on test and validation, and per fitted map (val score, paired gain
    over the floor, its interval); ``local`` adds the target row saying the edit names its region."""
    floor_val = floor if floor_val is None else floor_val
    rows = [_row(manip, "identity", "cos_mean", floor, family=family, **kw),
            _row(manip, "identity", metric, floor, family=family, **kw),
            _row(manip, "identity", f"val_{metric}", floor_val, family=family, **kw)]
    for name, (val, gain, ci) in maps.items():
        rows += [_row(manip, name, f"val_{metric}", val, family=family, **kw),
                 _row(manip, name, f"{metric}_gap_identity", gain, ci, family=family, **kw)]
    if local is not None:
        rows.append(_row(manip, "target", "local_edit", float(local), family=family, **kw))
    return rows


def test_a_paired_gain_that_the_unpaired_rule_misses_holds():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.85, 0.10, 48)  # per-photo difficulty, shared by both maps
    identity = difficulty
    linear = difficulty + 0.02 + rng.normal(0, 0.004, 48)
    id_mean, id_ci = _boot(identity)
    lin_mean, lin_ci = _boot(linear)
    gap, gap_ci = _boot(linear - identity)
    assert lin_ci[0] < id_mean  # the old rule (map's interval above identity's mean) misses this gain
    rows = _feasible("grayscale", id_mean, {"linear": (id_mean + 0.02, gap, gap_ci)})
    cases, controls = v.feasibility(_table(rows))
    case = cases.iloc[0]
    assert len(cases) == 1 and controls.empty and case["chosen"] == "linear"
    assert case["outcome"] == HOLDS
    assert case["min_effect"] == pytest.approx(0.1 * (1 - id_mean)) and case["gain"] >= case["min_effect"]


def test_feasibility_small_worse_underpowered_and_missing():
    rows = []
    for manip, gap, ci in [("tiny", 0.002, (0.001, 0.003)), ("worse", -0.05, (-0.07, -0.03)),
                           ("wide", 0.03, (-0.01, 0.07)), ("clear", 0.05, (0.04, 0.06))]:
        rows += _feasible(manip, 0.8, {"linear": (0.85, gap, ci)})
    rows += [r for r in _feasible("unfitted", 0.8, {"linear": (0.85, 0.05, (0.04, 0.06))})
             if r["metric"] != "cos_mean_gap_identity"]
    cases = _by(v.feasibility(_table(rows)).cases)
    assert cases.loc["tiny", "outcome"] == FAILS  # significant, but under the 10%-of-headroom minimum
    assert cases.loc["worse", "outcome"] == FAILS
    assert cases.loc["wide", "outcome"] == INCONCLUSIVE and cases.loc["wide", "photos_needed"] > 48
    assert cases.loc["clear", "outcome"] == HOLDS and np.isnan(cases.loc["clear", "photos_needed"])
    assert cases.loc["unfitted", "outcome"] == rules.NO_VERDICT
    assert "cos_mean_gap_identity" in cases.loc["unfitted", "note"]


def test_a_local_edit_is_judged_on_its_changed_region():
    """A mask: the whole-map gain is tiny (most positions unchanged), the changed-region gain large: learned."""
    rows = _feasible("mask_small", 0.97, {"linear": (0.975, 0.002, (0.001, 0.003))}, family="masking")
    rows += _feasible("mask_small", 0.60, {"linear": (0.70, 0.12, (0.10, 0.14))}, family="masking", local=True,
                      metric="cos_changed_mean")
    changed = v.feasibility(_table(rows)).cases.iloc[0]
    assert (changed["metric"], changed["outcome"], changed["local"]) == ("cos_changed_mean", HOLDS, True)
    whole = v.feasibility(_table(rows), region="whole").cases.iloc[0]
    assert (whole["metric"], whole["outcome"]) == ("cos_mean", FAILS)  # 0.002 < 10% of 0.03


def test_nothing_left_to_learn_is_set_apart():
    rows = _feasible("mirror_h", 0.95, {"linear": (0.949, -0.001, (-0.003, 0.001)),
                                        "cnn": (0.948, -0.002, (-0.004, 0.0))}, family="geometric")  # none beats it
    rows += _feasible("flat", 0.99, {"linear": (0.995, 0.004, (0.003, 0.005))}, floor_val=0.985)  # near the ceiling
    rows += _feasible("grayscale", 0.8, {"linear": (0.85, 0.05, (0.04, 0.06))})
    cases = _by(v.feasibility(_table(rows)).cases)
    assert cases.loc["mirror_h", "outcome"] == rules.NOTHING_TO_LEARN and "no fitted map beats" in cases.loc["mirror_h",
                                                                                                         "note"]
    assert cases.loc["flat", "outcome"] == rules.NOTHING_TO_LEARN and "within 0.02 of 1" in cases.loc["flat", "note"]
    counts = rules.count_outcomes(v.feasibility(_table(rows)).cases)
    assert counts.iloc[-1][["cases", HOLDS, rules.NOTHING_TO_LEARN, "verdict"]].tolist() == [1, 1, 2, HOLDS]


def test_partner_edits_are_controls_not_cases():
    rows = []
    for manip in ("background_swap", "object_paste", "object_recolour_red"):
        rows += _feasible(manip, 0.6, {"linear": (0.61, -0.01, (-0.02, 0.0))}, family="semantic")
    cases, controls = v.feasibility(_table(rows))
    assert cases["manipulation"].tolist() == ["object_recolour_red"]
    assert sorted(controls["manipulation"]) == ["background_swap", "object_paste"]
    assert (controls["outcome"] == FAILS).all()  # what "not learnable" looks like
    assert list(controls.columns) == list(cases.columns)
    close = v.closeness(_table([_row(m, "linear", "cos_mean_gap_transformer", 0.0, (-0.01, 0.01), family="semantic")
                                for m in ("background_swap", "object_blur")]))
    assert close.cases["manipulation"].tolist() == ["object_blur"] and len(close.controls) == 1


def test_best_map_is_chosen_on_validation_never_on_test():
    maps = {"mlp": (0.90, 0.04, (0.03, 0.05)), "cnn": (0.85, 0.08, (0.07, 0.09)), "linear": (0.86, 0.03, (0.02, 0.04))}
    rows = _feasible("hue_shift_60", 0.80, maps, floor_val=0.80)
    rows += [_row("hue_shift_60", "target", "val_cos_mean", 0.99)]  # the ceiling is no candidate
    best = v.feasibility(_table(rows)).cases.iloc[0]
    assert best["chosen"] == "mlp" and best["gain"] == pytest.approx(0.04) and best["outcome"] == HOLDS
    linear = v.feasibility(_table(rows), chosen="linear").cases.iloc[0]
    assert linear["chosen"] == "linear" and linear["gain"] == pytest.approx(0.03)
    no_val = _table([r for r in rows if not (r["metric"] == "val_cos_mean" and r["mapping"] != "identity")])
    case = v.feasibility(no_val).cases.iloc[0]
    assert case["outcome"] == rules.NO_VERDICT and "validation score" in case["note"]


def test_backbones_and_spatial_modes_never_mix():
    rows = []
    for backbone, ident, gap in [("lite0", 0.8, 0.05), ("resnet50", 0.9, 0.001)]:
        rows += _feasible("grayscale", ident, {"linear": (ident + 0.01, gap, (gap - 0.0005, gap + 0.0005))},
                          backbone=backbone)
    for spatial, ident, gap in [("applied", 0.7, 0.1), ("none", 0.2, -0.1)]:
        rows += _feasible("rotation_90", ident, {"linear": (ident + 0.01, gap, (gap - 0.01, gap + 0.01))},
                          family="geometric", spatial=spatial)
    cases = v.feasibility(_table(rows)).cases.set_index(["manipulation", "backbone", "spatial"])
    assert len(cases) == 3  # the raw-grid rotation is not a comparable case
    assert cases.loc[("grayscale", "lite0", "none"), "outcome"] == HOLDS
    assert cases.loc[("grayscale", "resnet50", "none"), "outcome"] == FAILS  # 0.001 < 10% of 0.1 headroom
    assert cases.loc[("grayscale", "resnet50", "none"), "floor"] == pytest.approx(0.9)
    every = v.feasibility(_table(rows), keep=None).cases.set_index(["manipulation", "spatial"])
    assert every.loc[("rotation_90", "none"), "floor"] == pytest.approx(0.2)
    assert every.loc[("rotation_90", "applied"), "floor"] == pytest.approx(0.7)
    assert every.loc[("rotation_90", "none"), "outcome"] == FAILS


def test_photos_to_decide_is_the_paired_sample_size_at_the_observed_spread():
    # a half-width of 0.02 on 48 photos: sd = 0.02 / 1.96 * sqrt(48); decide 0.01 from the boundary at 80% power
    sd = 0.02 / 1.959964 * np.sqrt(48)
    want = np.ceil(((1.959964 + 0.841621) * sd / 0.01) ** 2)
    assert rules.photos_to_decide(0.01, -0.01, 0.03, 48, 0.0) == want
    assert rules.photos_to_decide(0.0, -0.01, 0.01, 48, 0.0) == rules.MANY  # on the boundary: no number decides it
    # two maps equal to float rounding: a degenerate interval says nothing about a spread
    assert rules.photos_to_decide(2e-6, -1e-6, 5e-6, 40, 0.0) == rules.MANY
    assert np.isnan(rules.photos_to_decide(0.01, np.nan, np.nan, 48, 0.0))
    # more photos shrink the interval by sqrt(n): the computed size gives a decision at about that size
    assert want > 48


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
    cases = _by(v.closeness(_table(rows), "top1_agree", tolerance=0.05).cases)
    assert cases.loc["grayscale", "outcome"] == INCONCLUSIVE and cases.loc["grayscale", "versus"] == "transformer"
    assert cases.loc["noise_40", "outcome"] == FAILS
    assert cases.loc["hue_shift_60", "outcome"] == HOLDS and cases.loc["hue_shift_60", "versus"] == "transformer"
    assert cases.loc["hue_shift_60", "compared"] == "transformer,transformer_pe"
    assert cases.loc["hue_shift_60", "transformer_steps"] == 240
    assert cases.loc["hue_shift_60", "transformer_train_loss"] == pytest.approx(0.3)
    # lower is better: st_lpips linear - global = +0.2 means linear is worse
    lp = v.closeness(_table([_row("grayscale", "linear", "st_lpips_gap_transformer", 0.2, (0.15, 0.25))]),
                              "st_lpips", tolerance=0.05).cases.iloc[0]
    assert lp["outcome"] == FAILS and lp["gap"] == pytest.approx(-0.2)


# -- counting ------------------------------------------------------------------------------------------------

def test_count_outcomes_rules():
    cases = pd.DataFrame({"family": ["a", "a", "b", "b", "b", "c"],
                          "outcome": [HOLDS, HOLDS, HOLDS, INCONCLUSIVE, HOLDS, FAILS]})
    got = rules.count_outcomes(cases).set_index("family")
    assert got.loc["a", "verdict"] == HOLDS and got.loc["b", "verdict"] == INCONCLUSIVE
    assert got.loc["c", "verdict"] == FAILS and got.loc["overall", "verdict"] == FAILS
    assert got.loc["overall", [HOLDS, FAILS, INCONCLUSIVE]].tolist() == [4, 1, 1]
    assert rules.count_outcomes(cases, max_inconclusive_share=0.34).set_index("family").loc["b", "verdict"] == HOLDS
    most = rules.count_outcomes(cases, rule="most").set_index("family")
    assert most.loc["overall", "verdict"] == HOLDS and most.loc["c", "verdict"] == FAILS
    empty = rules.count_outcomes(cases.iloc[:0])
    assert empty["verdict"].tolist() == [INCONCLUSIVE] and empty["cases"].tolist() == [0]
    with pytest.raises(ValueError, match="not outcomes"):
        rules.count_outcomes(pd.DataFrame({"family": ["a"], "outcome": [True]}))


# -- claim 3 -------------------------------------------------------------------------------------------------

def test_geometry_flags_alpha_at_the_grid_edge_and_places_the_random_control_beside():
    rows = []
    for manip, alpha in [("mirror_h", max(geometry.RIDGE_GRID)), ("grayscale", 1.0), ("hue_shift_60", 0.0)]:
        family = "geometric" if manip == "mirror_h" else "photometric"
        for backbone, share in [("lite0", 0.4), ("lite0:random", 0.9)]:
            rows += [_row(manip, "linear", "ridge_alpha", alpha, family=family, backbone=backbone),
                     _row(manip, "linear", "delta_bias_share", share, (share - 0.1, share + 0.1), family=family,
                          backbone=backbone),
                     _row(manip, "linear_alpha0", "delta_bias_share", share / 2, family=family, backbone=backbone)]
    rows.append(_row("grayscale", "linear_rank4", "delta_bias_share", 0.1))  # not a geometry mapping
    geo = geometry.geometry_table(_table(rows), metrics=["delta_bias_share"])
    auto = geo[geo["alpha_setting"] == "auto"].set_index("manipulation")
    assert bool(auto.loc["mirror_h", "edge_alpha"]) and auto.loc["mirror_h", "edge_side"] == "high"
    assert not auto.loc["grayscale", "edge_alpha"] and not auto.loc["hue_shift_60", "edge_alpha"]  # 0: no low edge
    assert (auto["backbone"] == "lite0").all() and auto["random_value"].tolist() == pytest.approx([0.9] * 3)
    assert auto.loc["mirror_h", "ci_low"] == pytest.approx(0.3) and bool(auto.loc["mirror_h", "random_edge_alpha"])
    fixed = geo[geo["alpha_setting"] == "0"]
    assert len(fixed) == 3 and not fixed["edge_alpha"].any() and (fixed["alpha"] == 0).all()
    assert "linear_rank4" not in set(geo["mapping"]) and len(geo) == 6
    # a grid without 0: its smallest value is an edge too
    low = geometry.geometry_table(_table(rows), metrics=["delta_bias_share"], grid=(1.0, 10.0, 1000.0))
    low = low[low["alpha_setting"] == "auto"].set_index("manipulation")
    assert low.loc["grayscale", "edge_side"] == "low" and not low.loc["mirror_h", "edge_alpha"]
    summary = geometry.geometry_summary(geo)
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
    per, trend = v.depth_trend(table, layer_order=L)
    t = _by(trend)
    assert t.loc["rising", "outcome"] == HOLDS and t.loc["rising", "diff_low"] == pytest.approx(0.05)
    assert t.loc["falling", "outcome"] == FAILS
    assert t.loc["overlap", "outcome"] == INCONCLUSIVE
    assert t.loc["reversal", "outcome"] == INCONCLUSIVE and bool(t.loc["reversal", "reversal"])
    assert t.loc["two_layers", "outcome"] == INCONCLUSIVE and t.loc["two_layers", "n_layers"] == 2
    deep = per[(per["manipulation"] == "rising") & (per["layer"] == L[2])].iloc[0]
    assert deep["versus"] == "transformer_pe"  # its ci_low -0.03 is the lower: the hardest comparison
    assert v.depth_trend(table, layer_order=L, min_increase=0.2).trend.set_index("manipulation").loc[
        "rising", "outcome"] == FAILS  # the data rule out a rise of 0.2


def test_depth_gap_trend_drops_misaligned_stages_of_applied_rows_only():
    L = ["blocks.0", "blocks.2", "blocks.4", "blocks.6"]
    per_layer = [(L[0], "transformer", 0.5, 0.01), (L[1], "transformer", -0.1, 0.01),
                 (L[2], "transformer", -0.05, 0.01), (L[3], "transformer", 0.0, 0.01)]
    rows = _gaps("mirror_h", per_layer, family="geometric") + _gaps("grayscale", per_layer)
    rows += _gaps("mirror_h", per_layer, family="geometric", backbone="lite0:random")
    t = v.depth_trend(_table(rows), misaligned=[("lite0", "blocks.0")]).trend.set_index(["manipulation",
                                                                                                "backbone"])
    assert t.loc[("mirror_h", "lite0"), "outcome"] == HOLDS and t.loc[("mirror_h", "lite0"), "n_layers"] == 3
    assert t.loc[("grayscale", "lite0"), "outcome"] == FAILS  # no grid operation: blocks.0 stays
    assert t.loc[("mirror_h", "lite0:random"), "outcome"] == FAILS  # another backbone, its own stages
