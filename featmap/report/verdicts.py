"""The case rules of the study's claims over results tables, each case one of three outcomes from paired intervals
(``featmap.report.rules``), or set apart with its reason.

- Claim 1, feasibility (``feasibility``): the best map chosen on validation photos (or the pre-specified shared
  linear map) against the no-learning floor, on the changed positions of local edits; cases with nothing left to
  learn are set apart.
- Comparators (``comparators``): a global map counts only when it has learned.
- Claim 2 and semantic consistency (``closeness``): the shared linear map non-inferior to the harder valid global
  map on one metric.
- Claim 3b (``depth_trend``): the linear-to-global gap rising from the shallowest to the deepest layer.

The project's single definitions are used throughout: metric directions (``score.metrics``), the comparable spatial
mode (``core.table.comparable_rows``), the global maps (``maps.base.GLOBAL_MAPS``) and the partner-based controls
(``rules.CONTROLS``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd

from featmap.maps.base import GLOBAL_MAPS
from featmap.report.rules import (
    CONTROLS,
    HOLDS,
    INCONCLUSIVE,
    KEY,
    NO_VERDICT,
    NOT_FITTED,
    NOTHING_TO_LEARN,
    Split,
    comparable,
    filtered,
    is_control_edit,
    non_inferiority,
    orient,
    photos_to_decide,
    sign_of,
    split_controls,
    superiority,
    superiority_boundary,
    unique_rows,
)


class Trend(NamedTuple):
    """The per-layer gaps and the per-case directional verdict of ``depth_trend``."""

    per_layer: pd.DataFrame
    trend: pd.DataFrame


def _oriented_gaps(gaps: pd.DataFrame, names: dict[str, str], mapping: str, sign: float) -> pd.DataFrame:
    """Returns ``mapping``'s gap rows (one per case and metric) with the global map each compares against
    (``versus``), turned so that higher is better, and ``_rank``: the lower end of the interval (a gap without an
    interval ranks lowest, so it decides)."""
    unique_rows(gaps, KEY + ["metric"], f"{mapping} gap")
    gaps["versus"] = gaps["metric"].map(names)
    gaps["gap"], gaps["ci_low"], gaps["ci_high"] = orient(gaps["value"], gaps["ci_low"], gaps["ci_high"], sign)
    gaps["_rank"] = gaps["ci_low"].fillna(-np.inf)
    return gaps


# -- claim 1: feasibility ------------------------------------------------------------------------------------

NOTHING_LEFT = 0.02  # a floor within this of the ceiling (1 for cosines) on validation photos leaves nothing to learn
FEASIBILITY_COLUMNS = KEY + ["local", "metric", "chosen", "floor", "floor_val", "chosen_val", "headroom",
                             "min_effect", "gain", "gain_low", "gain_high", "n", "outcome", "photos_needed", "note"]


def feasibility(table: pd.DataFrame, min_effect_share: float = 0.1, region: str = "changed", chosen: str = "best",
                nothing_left: float = NOTHING_LEFT, controls: Iterable[str] = CONTROLS,
                keep: Callable[[pd.DataFrame], pd.DataFrame] | None = comparable) -> Split:
    """Returns (cases, controls): per case (``KEY``, after ``keep``), whether a map can be learned.

    Score: ``cos_changed_mean`` (the positions the edit changed) for a local edit when ``region`` is "changed" (a
    case is local when its ``target`` row ``local_edit`` is 1: a painted square or an object mask), else
    ``cos_mean`` (the whole map). Floor: ``identity`` (y = x; after the grid operation in the ``applied`` mode).
    ``chosen``: "best", the fitted map with the highest validation score (``val_<score>`` rows; never test), or
    "linear", the pre-specified shared linear map.

    Nothing to learn (``NOTHING_TO_LEARN``, set apart: neither a success nor a failure): the floor's validation
    score is within ``nothing_left`` of the ceiling 1, or no fitted map beats it on the validation photos.
    Otherwise the outcome is ``superiority`` of the chosen map's paired gain over the floor (its
    ``<score>_gap_identity`` row) against a minimum effect of ``min_effect_share`` times the floor's headroom
    (1 - floor on the test photos): holds when the interval lies above 0 and the gain reaches the minimum, does not
    hold when the interval lies below the minimum, else inconclusive (``photos_needed``: ``photos_to_decide``). A
    case missing a row the rule needs is ``NO_VERDICT`` with a ``note``. Partner-based edits go to ``controls``.
    """
    if region not in ("changed", "whole") or chosen not in ("best", "linear"):
        raise ValueError(f"region must be 'changed' or 'whole' and chosen 'best' or 'linear', got {region!r}, "
                         f"{chosen!r}")
    data = filtered(table, keep)
    floor_rows = data[(data["mapping"] == "identity") & (data["metric"] == "cos_mean")]
    cases = floor_rows.drop_duplicates(KEY).set_index(KEY).index
    if len(cases) == 0:
        return Split(pd.DataFrame(columns=FEASIBILITY_COLUMNS), pd.DataFrame(columns=FEASIBILITY_COLUMNS))
    local_rows = table[(table["mapping"] == "target") & (table["metric"] == "local_edit")]
    local = local_rows.drop_duplicates(["family", "manipulation", "backbone", "layer"]).set_index(
        ["family", "manipulation", "backbone", "layer"])["value"]
    out = []
    scores = ("cos_mean", "cos_changed_mean")
    needed = data[data["metric"].isin([*scores, *(f"val_{m}" for m in scores), *(f"{m}_gap_identity" for m in scores)])]
    by_case = dict(tuple(needed.groupby(KEY, sort=False)))  # one pass over the table, not one per case
    for case in cases:
        fam, manip, backbone, layer, spatial = case
        is_local = region == "changed" and bool(local.get((fam, manip, backbone, layer), 0) == 1)
        metric = "cos_changed_mean" if is_local else "cos_mean"
        here = by_case.get(case, needed.iloc[0:0])
        val = here[here["metric"] == f"val_{metric}"].drop_duplicates("mapping").set_index("mapping")["value"]
        test = here[here["metric"] == metric].drop_duplicates("mapping").set_index("mapping")["value"]
        gaps = here[here["metric"] == f"{metric}_gap_identity"].drop_duplicates("mapping").set_index("mapping")
        fitted_val = val[[m for m in val.index if m not in NOT_FITTED]]
        row = dict(zip(KEY, case), local=is_local, metric=metric, floor=test.get("identity", np.nan),
                   floor_val=val.get("identity", np.nan), note="")
        if chosen == "best":
            name = fitted_val.sort_values(ascending=False, kind="stable").index[0] if len(fitted_val) else None
        else:
            name = "linear" if "linear" in test.index or "linear" in gaps.index else None
        row["chosen"] = name
        row["chosen_val"] = fitted_val.get(name, np.nan) if name else np.nan
        row["headroom"] = 1 - row["floor"]
        row["min_effect"] = min_effect_share * max(row["headroom"], 0) if np.isfinite(row["headroom"]) else np.nan
        missing = [what for what, ok in (("the floor's test score", np.isfinite(row["floor"])),
                                         ("the floor's validation score", np.isfinite(row["floor_val"])),
                                         ("a fitted map's validation score", len(fitted_val) > 0),
                                         (f"{name}'s {metric}_gap_identity row", name in gaps.index)) if not ok]
        if missing:
            out.append({**row, "outcome": NO_VERDICT, "note": "missing " + ", ".join(missing)})
            continue
        if 1 - row["floor_val"] < nothing_left or fitted_val.max() <= row["floor_val"]:
            why = (f"the floor scores {row['floor_val']:.3f} on validation photos, within {nothing_left:g} of 1"
                   if 1 - row["floor_val"] < nothing_left else
                   f"no fitted map beats the floor on validation photos (best {fitted_val.max():.3f} against "
                   f"{row['floor_val']:.3f})")
            out.append({**row, "outcome": NOTHING_TO_LEARN, "note": why})
            continue
        g = gaps.loc[name]
        gain, low, high = float(g["value"]), float(g["ci_low"]), float(g["ci_high"])
        outcome = superiority(low, high, gain, row["min_effect"])
        need = photos_to_decide(gain, low, high, float(g["n"]), superiority_boundary(gain, row["min_effect"])) \
            if outcome == INCONCLUSIVE else np.nan
        out.append({**row, "gain": gain, "gain_low": low, "gain_high": high, "n": float(g["n"]), "outcome": outcome,
                    "photos_needed": need})
    return split_controls(pd.DataFrame(out).reindex(columns=FEASIBILITY_COLUMNS), controls)


# -- comparators: a global map counts only when it has learned ------------------------------------------------

COMPARATOR_COLUMNS = KEY + ["versus", "steps", "best_step", "stopped_early", "train_loss", "linear_train_loss",
                            "valid", "why"]
MAX_TRAIN_EXCESS = 0.01  # a comparator's training loss may exceed the shared linear map's by at most this share


def comparators(table: pd.DataFrame, global_maps: Iterable[str] = GLOBAL_MAPS, mapping: str = "linear",
                max_train_excess: float = MAX_TRAIN_EXCESS) -> pd.DataFrame:
    """Returns per case ``KEY`` and global map whether the global map counts as a comparator for ``mapping``.

    A global map is a comparator when it has learned: its training stopped early (``stopped_early`` row 1: the
    validation loss stopped improving before the step cap) and it fits its own training pairs at least as well as
    the shared linear map (its ``train_loss`` row at most (1 + ``max_train_excess``) times ``mapping``'s
    ``train_loss`` row of the same case: the same objective on the same pairs). ``why`` gives the reasons it does
    not count (a missing row is a reason). One row per (case, global map) that has any row in the case.
    """
    global_maps = tuple(global_maps)
    facts = table[table["metric"].isin(["steps", "best_step", "stopped_early", "train_loss"])
                  & table["mapping"].isin(global_maps + (mapping,))]
    if facts.empty:
        return pd.DataFrame(columns=COMPARATOR_COLUMNS)
    wide = facts.pivot_table(index=KEY + ["mapping"], columns="metric", values="value", aggfunc="first")
    wide = wide.reindex(columns=["steps", "best_step", "stopped_early", "train_loss"])
    linear = wide.xs(mapping, level="mapping")["train_loss"] if mapping in wide.index.get_level_values("mapping") \
        else pd.Series(dtype=float)
    present = set(table.loc[table["mapping"].isin(global_maps), KEY + ["mapping"]].itertuples(index=False, name=None))
    rows = []
    for key in sorted(present, key=lambda k: tuple(map(str, k))):
        *case, name = key
        got = wide.loc[key] if key in wide.index else pd.Series(np.nan, index=wide.columns)
        lin = float(linear.get(tuple(case), np.nan))
        why = []
        if not got["stopped_early"] == 1:
            why.append("it did not stop early (no stopped_early row)" if np.isnan(got["stopped_early"]) else
                       f"it ran to its step cap ({got['steps']:.0f} steps) without its validation loss settling")
        if np.isnan(got["train_loss"]) or np.isnan(lin):
            why.append("no train_loss row for it or for the shared linear map")
        elif got["train_loss"] > lin * (1 + max_train_excess):
            why.append(f"it fits its training pairs worse than the shared linear map (training loss "
                       f"{got['train_loss']:.4f} against {lin:.4f})")
        rows.append(dict(zip(KEY, case), versus=name, steps=got["steps"], best_step=got["best_step"],
                         stopped_early=got["stopped_early"], train_loss=got["train_loss"], linear_train_loss=lin,
                         valid=not why, why="; ".join(why)))
    return pd.DataFrame(rows, columns=COMPARATOR_COLUMNS)


def _valid_gaps(gaps: pd.DataFrame, valid: pd.DataFrame | None) -> pd.DataFrame:
    """Returns the gap rows whose global map (column ``versus``) is a valid comparator of the case (all without
    ``valid``)."""
    if valid is None:
        return gaps
    ok = set(valid.loc[valid["valid"].astype(bool), KEY + ["versus"]].itertuples(index=False, name=None))
    keep = [tuple(r) in ok for r in gaps[KEY + ["versus"]].itertuples(index=False, name=None)]
    return gaps[keep]


def _no_comparator_note(valid: pd.DataFrame, case: tuple) -> str:
    mine = valid[(valid[KEY].apply(tuple, axis=1) == case)] if len(valid) else valid
    if mine.empty:
        return "no global map ran"
    return "no valid comparator: " + "; ".join(f"{r.versus}: {r.why}" for r in mine.itertuples())


# -- claim 2 and semantic consistency: the shared linear map close to the harder valid global map --------

def closeness(table: pd.DataFrame, metric: str = "cos_mean", tolerance: float = 0.02,
                       global_maps: Iterable[str] = GLOBAL_MAPS, mapping: str = "linear",
                       higher_is_better: bool | None = None, controls: Iterable[str] = CONTROLS,
                       keep: Callable[[pd.DataFrame], pd.DataFrame] | None = comparable,
                       budget_metrics: Iterable[str] = ("steps", "best_step", "stopped_early", "train_loss"),
                       valid: pd.DataFrame | None = None) -> Split:
    """Returns (cases, controls): per case, whether ``mapping`` is non-inferior to the hardest global map.

    Reads rows ``<metric>_gap_<global>`` of ``mapping`` (value = mean over test photos of linear minus global,
    paired bootstrap interval), turned so that higher is better (see ``lower_is_better``). The hardest
    comparison per case ``KEY`` is the global map whose gap has the lower ci_low (a gap without an interval
    counts as lowest, so it decides: inconclusive). Outcome = ``non_inferiority(ci_low, ci_high, tolerance)``:
    close (holds) when ci_low > -tolerance, not close when ci_high < -tolerance, else inconclusive; an
    inconclusive case's ``photos_needed`` is ``photos_to_decide`` against -tolerance.
    ``compared`` lists the global maps with gap rows. Each global map's convergence is printed beside: columns
    ``<global>_<budget metric>`` from its rows ``steps`` / ``best_step`` / ``stopped_early`` / ``train_loss`` of the
    same case. ``valid`` (``comparators(table)``): only valid comparators are compared; a case without one is
    ``NO_VERDICT``, its ``note`` saying why. Partner-based edits go to ``controls``.
    """
    global_maps = tuple(global_maps)
    sign = sign_of(metric, higher_is_better)
    data = filtered(table, keep)
    names = {f"{metric}_gap_{g}": g for g in global_maps}
    budget_cols = [f"{g}_{b}" for g in global_maps for b in budget_metrics]
    columns = KEY + ["metric", "versus", "gap", "ci_low", "ci_high", "n", "tolerance", "outcome", "photos_needed",
                     "compared", "note"] + budget_cols
    gaps = data[data["metric"].isin(list(names)) & (data["mapping"] == mapping)].copy()
    if gaps.empty:
        return Split(pd.DataFrame(columns=columns), pd.DataFrame(columns=columns))
    gaps = _oriented_gaps(gaps, names, mapping, sign)
    every_case = gaps.drop_duplicates(KEY).set_index(KEY).index
    usable = _valid_gaps(gaps, valid)
    ordered = usable.sort_values(KEY + ["_rank", "versus"], na_position="first")
    hardest = ordered.drop_duplicates(KEY).set_index(KEY).reindex(every_case)
    out = hardest[["versus", "gap", "ci_low", "ci_high", "n"]].copy()
    out["metric"], out["tolerance"] = metric, tolerance
    out["outcome"] = non_inferiority(out["ci_low"], out["ci_high"], tolerance)
    out["photos_needed"] = np.where(out["outcome"] == INCONCLUSIVE, photos_to_decide(
        out["gap"], out["ci_low"], out["ci_high"], out["n"], -tolerance), np.nan)
    out["compared"] = usable.groupby(KEY)["versus"].agg(lambda v: ",".join(sorted(v))).reindex(out.index)
    out["note"] = ""
    missing = out["versus"].isna()
    out.loc[missing, "outcome"] = NO_VERDICT
    if missing.any():
        out.loc[missing, "note"] = [_no_comparator_note(valid, k) for k in out.index[missing]]
    for g in global_maps:
        rows = data[data["mapping"] == g]
        for b in budget_metrics:
            got = rows[rows["metric"] == b].drop_duplicates(KEY).set_index(KEY)["value"]
            out[f"{g}_{b}"] = got.reindex(out.index)
    return split_controls(out.reset_index()[columns], controls)


# -- claim 3b: linear sufficiency grows with depth -------------------------------------------------------------

def _misaligned(rows: pd.DataFrame, misaligned: Iterable) -> pd.Series:
    pairs = {tuple(m) if isinstance(m, (tuple, list)) else (None, m) for m in misaligned}
    hit = rows.apply(lambda r: (r["backbone"], r["layer"]) in pairs or (None, r["layer"]) in pairs, axis=1) \
        if len(rows) else pd.Series([], dtype=bool)
    return hit.astype(bool) & (rows["spatial"] == "applied")


def depth_trend(table: pd.DataFrame, metric: str = "cos_mean", global_maps: Iterable[str] = GLOBAL_MAPS,
                    mapping: str = "linear", layer_order: Iterable[str] | None = None, min_layers: int = 3,
                    min_increase: float = 0.0, misaligned: Iterable = (), higher_is_better: bool | None = None,
                    controls: Iterable[str] = CONTROLS,
                    keep: Callable[[pd.DataFrame], pd.DataFrame] | None = comparable,
                    valid: pd.DataFrame | None = None) -> Trend:
    """Returns (per_layer, trend): the linear-minus-best-global gap per layer, and per case whether "linear
    sufficiency grows with depth" (the gap rises from the shallowest to the deepest layer).

    per_layer: per case ``KEY`` the hardest global comparison (as ``claim_linear_close``: the lower ci_low of
    the turned gaps ``<metric>_gap_<global>``). Layers run in ``layer_order`` (default: first appearance in the
    table; layers it does not name are left out). ``misaligned``: layer names or (backbone, layer) pairs whose
    grid operation is not exact (see ``featmap.score.change.grid_alignment``); their spatial ``applied`` rows
    are dropped. Partner edits are dropped.

    trend, per (family, manipulation, backbone, spatial), paired-free and conservative: with the shallowest
    layer s and deepest d, the difference gap_d - gap_s and the range of differences both intervals allow,
    [low_d - high_s, high_d - low_s] (covers the true difference with at least 90% when each interval is 95%,
    with no assumption about how the layers' estimates correlate). Outcome = ``superiority`` on that range with
    ``min_increase``: holds when low_d > high_s (the intervals do not overlap, the deep gap above) and the
    difference >= ``min_increase``; does not hold when high_d - low_s < ``min_increase`` (with the default 0:
    the deep interval lies entirely below the shallow one); else inconclusive. A holds is downgraded to
    inconclusive when some deeper layer's interval lies entirely below a shallower layer's (a significant
    reversal: the rise is not monotone). Fewer than ``min_layers`` layers: inconclusive. ``photos_needed``: for an
    inconclusive case, ``photos_to_decide`` on that range (test photos per layer).
    ``valid`` (``comparators(table)``): only valid comparators are compared; a case with fewer than ``min_layers``
    layers that have one is ``NO_VERDICT``, its ``note`` naming the layers without one and why.
    """
    global_maps = tuple(global_maps)
    sign = sign_of(metric, higher_is_better)
    order = list(dict.fromkeys(layer_order if layer_order is not None else table["layer"]))
    data = filtered(table, keep)
    data = data[~is_control_edit(data["manipulation"], controls)] if len(data) else data
    names = {f"{metric}_gap_{g}": g for g in global_maps}
    gaps = data[data["metric"].isin(list(names)) & (data["mapping"] == mapping)].copy()
    gaps = gaps[~_misaligned(gaps, misaligned).to_numpy()] if len(gaps) else gaps
    gaps = gaps[gaps["layer"].isin(order)]
    per_cols = KEY + ["depth", "versus", "gap", "ci_low", "ci_high", "n"]
    case = ["family", "manipulation", "backbone", "spatial"]
    trend_cols = case + ["layers", "n_layers", "shallow", "deep", "gap_shallow", "gap_deep", "diff", "diff_low",
                         "diff_high", "reversal", "n", "outcome", "photos_needed", "note"]
    if gaps.empty:
        return Trend(pd.DataFrame(columns=per_cols), pd.DataFrame(columns=trend_cols))
    gaps = _oriented_gaps(gaps, names, mapping, sign)
    layers_of = gaps.groupby(case, sort=False)["layer"].agg(lambda s: list(dict.fromkeys(s)))
    gaps = _valid_gaps(gaps, valid)
    per = gaps.sort_values(KEY + ["_rank", "versus"]).drop_duplicates(KEY).copy()
    per["depth"] = per["layer"].map({name: i for i, name in enumerate(order)})
    per = per.sort_values(case + ["depth"])[per_cols].reset_index(drop=True)
    rows = []
    for k, all_layers in layers_of.items():
        d = per[(per[case].apply(tuple, axis=1) == tuple(k))] if len(per) else per
        d = d.sort_values("depth")
        row = dict(zip(case, k), layers=",".join(d["layer"]), n_layers=len(d), note="")
        if len(d) < min_layers:
            lacking = [layer for layer in all_layers if layer not in set(d["layer"])]
            if valid is not None and lacking and len(all_layers) >= min_layers:
                why = "; ".join(f"{layer}: " + _no_comparator_note(valid, (*k[:3], layer, k[3])) for layer in lacking)
                rows.append({**row, "outcome": NO_VERDICT, "note": why})
            else:
                rows.append({**row, "outcome": INCONCLUSIVE, "note": f"{len(d)} layers, fewer than {min_layers}"})
            continue
        s, e = d.iloc[0], d.iloc[-1]
        lo, hi = d["ci_low"].to_numpy(), d["ci_high"].to_numpy()
        reversal = bool(any(hi[j] < lo[i] for i in range(len(d)) for j in range(i + 1, len(d))))
        diff, diff_low, diff_high = e["gap"] - s["gap"], e["ci_low"] - s["ci_high"], e["ci_high"] - s["ci_low"]
        outcome = superiority(diff_low, diff_high, diff, min_increase)
        note = ""
        if outcome == HOLDS and reversal:
            outcome, note = INCONCLUSIVE, "the deep gap is higher, but a deeper layer lies below a shallower one"
        n = float(min(s["n"], e["n"]))
        # the conservative range is about twice a paired interval: its half-width read as one is cautious
        need = photos_to_decide(diff, diff_low, diff_high, n, superiority_boundary(diff, min_increase)) \
            if outcome == INCONCLUSIVE else np.nan
        rows.append({**row, "shallow": s["layer"], "deep": e["layer"], "gap_shallow": s["gap"], "gap_deep": e["gap"],
                     "diff": diff, "diff_low": diff_low, "diff_high": diff_high, "reversal": reversal, "n": n,
                     "outcome": outcome, "photos_needed": need, "note": note})
    return Trend(per, pd.DataFrame(rows, columns=trend_cols))
