"""The claims on planted tables: every verdict follows from the numbers it is given, in three outcomes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from featmap.core.table import COLUMNS, row
from featmap.report import claims
from featmap.report import verdicts as v
from featmap.report.verdicts import FAILS, HOLDS, INCONCLUSIVE
from featmap.run.chapter import gap_rows


def _row(family, manip, mapping, metric, value, ci=None, layer="blocks.6", backbone="b", spatial=None):
    spatial = spatial or ("applied" if family == "geometric" else "none")
    base = {"family": family, "manipulation": manip, "backbone": backbone, "layer": layer, "mapping": mapping,
            "spatial": spatial}
    return row(base, metric, value, 10, ci or (value - 0.01, value + 0.01))


def _converged(family, manip, maps=("transformer", "transformer_pe"), train_loss=0.29, stopped=1, **kw):
    """Returns the convergence rows that make ``maps`` valid comparators (stopped early, a training loss below the
    shared linear map's 0.30) unless told otherwise."""
    rows = [_row(family, manip, "linear", "train_loss", 0.30, **kw)]
    for name in maps:
        rows += [_row(family, manip, name, "stopped_early", stopped, **kw),
                 _row(family, manip, name, "train_loss", train_loss, **kw)]
    return rows


def _case(family, manip, identity, gain, ci, **kw):
    return [_row(family, manip, "identity", "cos_mean", identity, **kw),
            _row(family, manip, "linear", "cos_mean_gap_identity", gain, ci, **kw)]


def test_claim_one_is_paired_needs_a_minimum_effect_and_keeps_controls_apart():
    rows = (_case("photometric", "grayscale", 0.80, 0.05, (0.04, 0.06))  # holds: above 0 and >= 0.02
            + _case("masking", "mask_small_square_center", 0.97, 0.004, (0.003, 0.005))  # paired, >= 10% of 0.03
            + _case("photometric", "noise_40", 0.50, 0.01, (0.005, 0.015))  # real but below 0.05: does not hold
            + _case("semantic", "object_recolor", 0.80, 0.03, (-0.01, 0.07))  # interval straddles: inconclusive
            + _case("semantic", "background_swap", 0.60, -0.10, (-0.15, -0.05)))  # a control, never counted
    got = claims.claim_learnable(pd.DataFrame(rows, columns=COLUMNS), "cos_mean", 0.1)
    outcome = got.cases.set_index("manipulation")["outcome"]
    assert outcome.to_dict() == {"grayscale": HOLDS, "mask_small_square_center": HOLDS, "noise_40": FAILS,
                                 "object_recolor": INCONCLUSIVE}
    assert list(got.controls["manipulation"]) == ["background_swap"]
    assert got.verdict == FAILS and got.counts.iloc[-1]["cases"] == 4  # one case fails: not "every manipulation"
    assert "masking: 1 of 1 hold" in got.measured


def test_the_unpaired_rule_would_miss_the_paired_gain():
    # identity's mean 0.970, the linear map's own interval reaches below it, but photo by photo it is always better
    rng = np.random.default_rng(0)
    ident = rng.uniform(0.90, 1.0, 40)
    linear = ident + 0.004
    base = {"family": "masking", "manipulation": "m", "backbone": "b", "layer": "l", "spatial": "none"}
    gaps = gap_rows(base, {"identity": {"cos_mean": ident}, "linear": {"cos_mean": linear}}, 200, 0)
    (gap,) = [r for r in gaps if r["metric"] == "cos_mean_gap_identity"]
    assert gap["ci_low"] > 0  # paired: the interval of the difference excludes 0
    unpaired_low = np.quantile([rng.choice(linear, 40).mean() for _ in range(200)], 0.025)
    assert unpaired_low < ident.mean()  # the old rule (interval of the map vs identity's mean) could not decide


def test_claim_two_is_non_inferiority_with_three_outcomes():
    rows = []
    for manip, (gap, ci) in {"a": (-0.005, (-0.01, 0.0)), "b": (-0.05, (-0.07, -0.03)), "c": (-0.02, (-0.1, 0.06))
                             }.items():
        rows += [_row("photometric", manip, "linear", "cos_mean_gap_transformer", gap, ci),
                 _row("photometric", manip, "linear", "cos_mean_gap_transformer_pe", gap + 0.01,
                      (ci[0] + 0.01, ci[1] + 0.01))] + _converged("photometric", manip)
    got = claims.claim_linear_close(pd.DataFrame(rows, columns=COLUMNS), {"cos_mean": 0.02})
    outcome = got.cases.set_index("manipulation")["outcome"]
    assert outcome.to_dict() == {"a": HOLDS, "b": FAILS, "c": INCONCLUSIVE}  # c is under-powered: not "close"
    assert set(got.cases["versus"]) == {"transformer"}  # the harder comparison decides
    assert got.verdict == INCONCLUSIVE  # 1 of 3 hold, 1 of 3 fail: no majority either way


def test_a_global_map_that_has_not_learned_is_no_comparator():
    """transformer fits its training pairs worse than the linear map (0.35 > 0.30 * 1.01): only transformer_pe is
    compared; where transformer_pe also ran to its cap, the case gets no verdict and the note says why."""
    rows = []
    for manip in ("a", "b"):
        rows += [_row("photometric", manip, "linear", "cos_mean_gap_transformer", -0.10, (-0.12, -0.08)),
                 _row("photometric", manip, "linear", "cos_mean_gap_transformer_pe", -0.005, (-0.01, 0.0))]
    rows += _converged("photometric", "a", ["transformer"], train_loss=0.35)
    rows += [r for r in _converged("photometric", "a", ["transformer_pe"]) if r["mapping"] != "linear"]
    rows += _converged("photometric", "b", ["transformer"], train_loss=0.35)
    rows += [r for r in _converged("photometric", "b", ["transformer_pe"], stopped=0) if r["mapping"] != "linear"]
    table = pd.DataFrame(rows, columns=COLUMNS)
    valid = v.comparators(table).set_index(["manipulation", "versus"])
    assert not valid.loc[("a", "transformer"), "valid"] and valid.loc[("a", "transformer_pe"), "valid"]
    assert "worse than the shared linear map" in valid.loc[("a", "transformer"), "why"]
    got = claims.claim_linear_close(table, {"cos_mean": 0.02})
    by = got.cases.set_index("manipulation")
    assert by.loc["a", "outcome"] == HOLDS and by.loc["a", "versus"] == "transformer_pe"
    assert by.loc["b", "outcome"] == v.NO_VERDICT and "did not stop early" not in by.loc["b", "note"]
    assert "ran to its step cap" in by.loc["b", "note"] and "worse than the shared linear map" in by.loc["b", "note"]
    overall = got.counts.iloc[-1]
    assert (overall["cases"], overall[v.NO_VERDICT], got.verdict) == (1, 1, HOLDS)


def test_claims_without_rows_are_not_measured():
    empty = pd.DataFrame(columns=COLUMNS)
    assert claims.claim_linear_close(empty, {"cos_mean": 0.02}).verdict == claims.NOT_MEASURED
    assert claims.claim_geometry(None).verdict == claims.NOT_MEASURED
    assert claims.claim_depth(empty).verdict == claims.NOT_MEASURED
    table = claims.overall([claims.claim_geometry(None)])
    assert list(table.columns) == ["claim", "verdict", "measured", "paper"] and table.loc[0, "claim"] == 3


def test_claim_three_counts_low_rank_only_below_the_noise_floor():
    rows = []
    for manip, erank, floor in (("grayscale", 0.2, (0.5, 0.6)), ("noise_40", 0.55, (0.5, 0.6))):
        rows += [_row("photometric", manip, "linear", "delta_erank_frac", erank),
                 _row("photometric", manip, "linear", "delta_erank_floor_frac", 0.55, floor),
                 _row("photometric", manip, "linear", "delta_bias_share", 0.4),
                 _row("photometric", manip, "linear", "ridge_alpha", 1.0)]
    got = claims.claim_geometry(pd.DataFrame(rows, columns=COLUMNS))
    assert got.verdict == claims.DESCRIBED and "below its noise floor in 1 of 2 cases" in got.measured


def test_read_all_leaves_out_the_layers_table():
    t = pd.DataFrame([_row("masking", "m", "linear", "cos_mean", 0.9)], columns=COLUMNS)
    stacked = claims.read_all({"masking": t, "layers": t})
    assert list(stacked.chapter) == ["masking"]
    assert list(claims.read_all({"masking": t, "backbones": t}).chapter) == ["masking"]


def _judge_rows(layer, reext, target_lpips, unrelated_lpips):
    return [_row("photometric", "grayscale", "target", "cos_reextract_median", reext, layer=layer),
            _row("photometric", "grayscale", "target", "lpips", target_lpips, layer=layer),
            _row("photometric", "grayscale", "unrelated", "lpips", unrelated_lpips, layer=layer)]


def test_the_judge_sanity_line_fails_a_blind_inverter_and_its_layer_gets_no_image_verdict():
    rows = (_judge_rows("blocks.4", 0.62, 0.30, 0.70)  # sees: recognisable and far closer than an unrelated photo
            + _judge_rows("blocks.6", 0.02, 0.75, 0.70))  # blind: grey blur, no closer than another photo
    for layer in ("blocks.4", "blocks.6"):
        rows.append(_row("photometric", "grayscale", "linear", "ssim_gap_transformer", 0.0, (-0.005, 0.005),
                         layer=layer))
        rows += _converged("photometric", "grayscale", ["transformer"], layer=layer)
    table = pd.DataFrame(rows, columns=COLUMNS)
    judge = claims.judge_sanity(table).set_index("layer")
    assert bool(judge.loc["blocks.4", "judge_ok"]) and not judge.loc["blocks.6", "judge_ok"]
    assert "re-extraction cosine 0.02 < 0.5" in judge.loc["blocks.6", "why"]
    got = claims.claim_linear_close(table, {"ssim": 0.02})
    assert list(got.cases["layer"]) == ["blocks.4"] and "no verdict for grayscale at blocks.6" in got.measured


def test_the_judge_decides_per_edit_an_edit_it_cannot_draw_gets_no_verdict_the_others_do():
    """At one layer the decoder draws grayscale recognisably but not pixel noise (its re-extraction cosine is low):
    noise gets no image-space verdict while grayscale keeps its own; the layer line counts 1 of 2 seen."""
    rows = []
    for manip, reext in (("grayscale", 0.55), ("noise_40", 0.22)):
        rows += [_row("photometric", manip, "target", "cos_reextract_median", reext, layer="blocks.2"),
                 _row("photometric", manip, "target", "lpips", 0.08, layer="blocks.2"),
                 _row("photometric", manip, "unrelated", "lpips", 0.50, layer="blocks.2"),
                 _row("photometric", manip, "linear", "ssim_gap_transformer", 0.0, (-0.005, 0.005), layer="blocks.2")]
        rows += _converged("photometric", manip, ["transformer"], layer="blocks.2")
    table = pd.DataFrame(rows, columns=COLUMNS)
    judge = claims.judge_sanity(table).set_index("manipulation")
    assert judge["judge_ok"].to_dict() == {"grayscale": True, "noise_40": False}
    line = claims.judge_by_layer(table).iloc[0]
    assert (line.seen, line.cases) == (1, 2) and line.target_cos_reextract_median == 0.55
    assert line.blind.startswith("noise_40 (re-extraction cosine 0.22 < 0.5")
    got = claims.claim_linear_close(table, {"ssim": 0.02})
    assert list(got.cases["manipulation"]) == ["grayscale"] and "no verdict for noise_40 at blocks.2" in got.measured


def test_image_space_claim_two_says_when_no_global_map_ran_where_the_judge_can_see():
    """The judge sees at blocks.2 (image space's default layer) but the global maps were trained at blocks.6 only:
    the image metric gets no verdict, and the claim says why instead of dropping it silently."""
    rows = _judge_rows("blocks.2", 0.55, 0.08, 0.40) + [
        _row("photometric", "grayscale", "linear", "ssim", 0.8, layer="blocks.2"),
        _row("photometric", "grayscale", "linear", "cos_mean_gap_transformer", -0.005, (-0.01, 0.0))] \
        + _converged("photometric", "grayscale", ["transformer"])
    got = claims.claim_linear_close(pd.DataFrame(rows, columns=COLUMNS), {"cos_mean": 0.02, "ssim": 0.02})
    assert list(got.cases["metric"]) == ["cos_mean"] and got.verdict == HOLDS
    assert "ssim: no verdict (no global map was scored in image space at blocks.2" in got.measured
