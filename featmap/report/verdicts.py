"""Decision rules over results tables: every verdict is one of three outcomes, computed from paired intervals.

``HOLDS`` (the data show it), ``FAILS`` (the data show the opposite, or rule out a worthwhile effect) and
``INCONCLUSIVE`` (the interval cannot decide). Rows are the long results table of DESIGN.md (family,
manipulation, backbone, layer, mapping, spatial, metric, value, n, ci_low, ci_high). Every join key holds
backbone and spatial (``KEY``), so two backbones or two spatial modes never mix. Intervals are the paired
bootstrap intervals the table carries; ``gap`` rows are per-photo differences of two maps on the same photos.

The project's single definitions are used throughout: metric directions from the metric registry
(``score.metrics.higher_is_better``), the comparable spatial mode (``core.table.comparable_rows``), the global maps
(``maps.base.GLOBAL_MAPS``), the ridge grid (``maps.stats.RIDGE_GRID``) and which edits are partner-based
controls (``CONTROLS``: the editors marked as controls).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd

from featmap.core.table import comparable_rows
from featmap.edits.editors import EDITORS, is_control
from featmap.maps.base import GLOBAL_MAPS
from featmap.maps.stats import RIDGE_GRID
from featmap.score.metrics import higher_is_better as _higher_is_better

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
OUTCOMES = (HOLDS, FAILS, INCONCLUSIVE)
# A case the rule cannot be applied to (say, no valid comparator): counted and named apart, never in a verdict.
NO_VERDICT = "no verdict"

KEY = ["family", "manipulation", "backbone", "layer", "spatial"]
# Edits whose target depends on a random partner photo: not a function of the original, so negative controls
# (the editors marked ``control``).
CONTROLS = tuple(name for name in EDITORS.names() if is_control(name))
NOT_FITTED = ("identity", "target")  # rows that are no fitted map (identity is the floor, target the ceiling)
RANDOM_SUFFIX = ":random"


class Split(NamedTuple):
    """Cases (the claim is tested on them) and controls (partner-based edits, reported beside, never counted)."""

    cases: pd.DataFrame
    controls: pd.DataFrame


class Trend(NamedTuple):
    """The per-layer gaps and the per-case directional verdict of ``depth_gap_trend``."""

    per_layer: pd.DataFrame
    trend: pd.DataFrame


# -- the three-outcome rules --------------------------------------------------------------------------------

def _outcomes(rule: Callable[..., str], *args):
    """Applies a scalar rule elementwise; returns a str for scalars, a Series (index of the first Series
    argument) or an array otherwise."""
    index = next((a.index for a in args if isinstance(a, pd.Series)), None)
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in args])
    if arrays[0].ndim == 0:
        return rule(*(float(a) for a in arrays))
    out = np.array([rule(*vals) for vals in zip(*(a.ravel() for a in arrays))], dtype=object).reshape(arrays[0].shape)
    return pd.Series(out, index=index, dtype=object) if index is not None else out


def _superiority(ci_low: float, ci_high: float, effect: float, min_effect: float) -> str:
    if ci_high < min_effect:
        return FAILS
    if ci_low > 0 and effect >= min_effect:
        return HOLDS
    return INCONCLUSIVE


def superiority(ci_low, ci_high, effect, min_effect):
    """Returns the outcome of "the gain is real and worthwhile" for a gain (higher is better) and its interval.

    Rule, in this order: ``FAILS`` when ci_high < min_effect (the interval rules out a worthwhile gain; this
    includes a gain that is real but smaller than ``min_effect``, and a clear loss); ``HOLDS`` when ci_low > 0
    and the point gain ``effect`` >= ``min_effect`` (a real gain of at least the minimum size); else
    ``INCONCLUSIVE``. NaN anywhere (no interval, no minimum) gives ``INCONCLUSIVE``. Scalars give a str;
    Series or arrays (broadcast) give one outcome per element.
    """
    return _outcomes(_superiority, ci_low, ci_high, effect, min_effect)


def _non_inferiority(ci_low: float, ci_high: float, tolerance: float) -> str:
    if ci_low > -tolerance:
        return HOLDS
    if ci_high < -tolerance:
        return FAILS
    return INCONCLUSIVE


def non_inferiority(ci_low, ci_high, tolerance):
    """Returns the outcome of "not worse by more than ``tolerance``" for a difference (higher is better).

    Rule: ``HOLDS`` (close) when ci_low > -tolerance (the interval excludes a loss of ``tolerance`` or more);
    ``FAILS`` (not close) when ci_high < -tolerance (the interval excludes being close); else ``INCONCLUSIVE``
    (an under-powered interval straddling -tolerance). NaN gives ``INCONCLUSIVE``. Scalars give a str, Series
    or arrays one outcome per element.
    """
    return _outcomes(_non_inferiority, ci_low, ci_high, tolerance)


# -- helpers ----------------------------------------------------------------------------------------------

def lower_is_better(metric: str) -> bool:
    """Returns whether lower values of ``metric`` are better (the metric registry's direction)."""
    return not _higher_is_better(metric)


comparable = comparable_rows


def _sign(metric: str, higher_is_better: bool | None) -> float:
    """Returns +1 when larger ``metric`` values are better (from the registry unless given), else -1."""
    lower = lower_is_better(metric) if higher_is_better is None else not higher_is_better
    return -1.0 if lower else 1.0


def _is_control(manipulation: pd.Series, controls: Iterable[str]) -> pd.Series:
    controls = tuple(controls)
    return manipulation.map(lambda m: any(m == c or str(m).startswith(c + "_") for c in controls)).astype(bool)


def _unique(rows: pd.DataFrame, key: list[str], what: str) -> pd.DataFrame:
    dup = rows.duplicated(key, keep=False)
    if dup.any():
        first = rows.loc[dup, key].iloc[0].to_dict()
        raise ValueError(f"{int(dup.sum())} {what} rows share a key, e.g. {first}: stack chapters with distinct "
                         "keys (backbone, spatial) or drop the repeats before deciding")
    return rows.set_index(key)


def _orient(value, low, high, sign: float):
    """Returns (value, low, high) turned so that higher is better."""
    if sign > 0:
        return value, low, high
    return -value, -high, -low


def _split(out: pd.DataFrame, controls: Iterable[str]) -> Split:
    is_control = _is_control(out["manipulation"], controls) if len(out) else pd.Series([], dtype=bool)
    return Split(out[~is_control].reset_index(drop=True), out[is_control].reset_index(drop=True))


def _oriented_gaps(gaps: pd.DataFrame, names: dict[str, str], mapping: str, sign: float) -> pd.DataFrame:
    """Returns ``mapping``'s gap rows (one per case and metric) with the global map each compares against
    (``versus``), turned so that higher is better, and ``_rank``: the lower end of the interval (a gap without an
    interval ranks lowest, so it decides)."""
    _unique(gaps, KEY + ["metric"], f"{mapping} gap")
    gaps["versus"] = gaps["metric"].map(names)
    gaps["gap"], gaps["ci_low"], gaps["ci_high"] = _orient(gaps["value"], gaps["ci_low"], gaps["ci_high"], sign)
    gaps["_rank"] = gaps["ci_low"].fillna(-np.inf)
    return gaps


def _filtered(table: pd.DataFrame, keep: Callable[[pd.DataFrame], pd.DataFrame] | None) -> pd.DataFrame:
    return table if keep is None else keep(table)


# -- claim 1: a map can be learned for every manipulation ---------------------------------------------------

LEARNABLE_COLUMNS = KEY + ["mapping", "metric", "identity", "headroom", "min_effect", "gain", "gain_low",
                           "gain_high", "n", "outcome", "note", "best_map_val", "best_val_score", "best_test_value",
                           "best_gain", "best_gain_low", "best_gain_high", "best_outcome", "best_note"]


def claim_learnable(table: pd.DataFrame, metric: str = "cos_mean", mapping: str = "linear",
                    min_effect_share: float = 0.1, controls: Iterable[str] = CONTROLS,
                    higher_is_better: bool | None = None, bound: float | None = None,
                    keep: Callable[[pd.DataFrame], pd.DataFrame] | None = comparable,
                    validation: pd.DataFrame | None = None) -> Split:
    """Returns (cases, controls): per case, whether the pre-specified ``mapping`` learns the edit, by the paired
    gain over identity.

    Reads, per case ``KEY`` (family, manipulation, backbone, layer, spatial), after ``keep`` (default
    ``comparable``; None keeps every row): the row ``<metric>_gap_identity`` of ``mapping`` (value = mean over
    test photos of map minus identity, ci_low / ci_high = its paired bootstrap interval) and identity's own
    ``<metric>`` row. Gain = the gap turned so that higher is better (``higher_is_better`` None: from
    ``lower_is_better(metric)``). Headroom = ``bound`` - identity (lower-is-better: identity - ``bound``);
    ``bound`` None is 1 for higher-is-better metrics (cosines, agreement, SSIM), 0 otherwise. Minimum effect =
    ``min_effect_share`` * max(headroom, 0). Outcome = ``superiority(gain_low, gain_high, gain, min_effect)``:
    holds when the paired interval lies above 0 and the gain reaches the minimum effect, does not hold when
    the interval's upper end is below the minimum effect, else inconclusive. A case missing either row is
    inconclusive, with a ``note``.

    Best map: chosen on validation scores, never on test. ``validation`` (a frame of rows ``val_<metric>`` or
    ``<metric>``), else the table's own ``val_<metric>`` rows; among fitted maps (not identity or target) the
    best validation score wins, and its test value, paired gain over identity and outcome (same rule) are
    reported. Without validation rows for a case, ``best_map_val`` is empty and ``best_note`` says so.

    Partner-based edits (``controls``: the names, or names followed by ``_...``) are computed the same way
    and returned in ``controls``, never in ``cases``.
    """
    sign = _sign(metric, higher_is_better)
    bound = (1.0 if sign > 0 else 0.0) if bound is None else float(bound)
    data = _filtered(table, keep)
    ident = _unique(data[(data["mapping"] == "identity") & (data["metric"] == metric)], KEY, f"identity {metric}")
    gap_name = f"{metric}_gap_identity"
    gaps = data[data["metric"] == gap_name]
    own = _unique(gaps[gaps["mapping"] == mapping], KEY, f"{mapping} {gap_name}")
    index = ident.index.union(own.index)
    if len(index) == 0:
        return Split(pd.DataFrame(columns=LEARNABLE_COLUMNS), pd.DataFrame(columns=LEARNABLE_COLUMNS))
    out = pd.DataFrame(index=index)
    out["mapping"], out["metric"] = mapping, metric
    out["identity"] = ident["value"].reindex(index)
    out["headroom"] = sign * (bound - out["identity"])
    out["min_effect"] = min_effect_share * out["headroom"].clip(lower=0)
    g = own.reindex(index)
    out["gain"], out["gain_low"], out["gain_high"] = _orient(g["value"], g["ci_low"], g["ci_high"], sign)
    out["n"] = g["n"]
    out["outcome"] = superiority(out["gain_low"], out["gain_high"], out["gain"], out["min_effect"])
    out["note"] = ""
    out.loc[g["value"].isna(), "note"] = f"no {gap_name} row for {mapping}"
    out.loc[out["identity"].isna(), "note"] = f"no identity {metric} row"
    out.loc[(out["note"] != "") | out["gain_low"].isna(), "outcome"] = INCONCLUSIVE
    out = out.join(_best_on_validation(data, table, validation, metric, gaps, out, sign), how="left")
    out = out.reset_index()
    return _split(out[LEARNABLE_COLUMNS], controls)


def _best_on_validation(data: pd.DataFrame, table: pd.DataFrame, validation: pd.DataFrame | None, metric: str,
                        gaps: pd.DataFrame, cases: pd.DataFrame, sign: float) -> pd.DataFrame:
    val_name = f"val_{metric}"
    if validation is None:
        val = data[data["metric"] == val_name]
        source = f"no validation rows ({val_name})"
    else:
        val = validation[validation["metric"].isin([val_name, metric])]
        source = f"no rows of the validation frame ({val_name} or {metric})"
        if len(val):
            val = val[val.set_index(KEY).index.isin(cases.index)]
    val = val[~val["mapping"].isin(NOT_FITTED)]
    best = pd.DataFrame(index=cases.index.sort_values(), columns=[
        "best_map_val", "best_val_score", "best_test_value", "best_gain", "best_gain_low", "best_gain_high",
        "best_outcome", "best_note"])  # a sorted key: lookups by a full key stay fast (and quiet)
    best["best_note"] = f"{source}: best map not chosen (never chosen on test)"
    if len(val):
        _unique(val, KEY + ["mapping"], f"validation {metric}")
        ranked = val.assign(score=sign * val["value"]).sort_values(KEY + ["score", "mapping"],
                                                                   ascending=[True] * len(KEY) + [False, True])
        top = ranked.drop_duplicates(KEY).set_index(KEY)
        top = top[top.index.isin(cases.index)]
        best.loc[top.index, "best_map_val"] = top["mapping"]
        best.loc[top.index, "best_val_score"] = top["value"]
        best.loc[top.index, "best_note"] = ""
        test = data[data["metric"] == metric].set_index(KEY + ["mapping"])["value"]
        test = test[~test.index.duplicated()].sort_index()  # sorted: lookups by a full key stay fast and quiet
        gap = gaps.set_index(KEY + ["mapping"])
        gap = gap[~gap.index.duplicated()].sort_index()
        for idx, name in top["mapping"].items():
            k = tuple(idx) + (name,)
            best.loc[idx, "best_test_value"] = test.get(k, np.nan)
            if k in gap.index:
                v, lo, hi = _orient(*(float(gap.loc[k, c]) for c in ("value", "ci_low", "ci_high")), sign)
                best.loc[idx, ["best_gain", "best_gain_low", "best_gain_high"]] = [v, lo, hi]
            else:
                best.loc[idx, "best_note"] = f"no {metric}_gap_identity row for {name}"
    for c in ("best_val_score", "best_test_value", "best_gain", "best_gain_low", "best_gain_high"):
        best[c] = pd.to_numeric(best[c], errors="coerce")
    best["best_outcome"] = superiority(best["best_gain_low"], best["best_gain_high"], best["best_gain"],
                                       cases["min_effect"].reindex(best.index))
    best.loc[best["best_map_val"].isna(), "best_outcome"] = INCONCLUSIVE
    return best


# -- comparators: a global map counts only when it has learned -----------------------------------------------

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


# -- claim 2: the shared linear map is close to the best global map ----------------------------------------

def claim_linear_close(table: pd.DataFrame, metric: str = "cos_mean", tolerance: float = 0.02,
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
    close (holds) when ci_low > -tolerance, not close when ci_high < -tolerance, else inconclusive.
    ``compared`` lists the global maps with gap rows. Each global map's convergence is printed beside: columns
    ``<global>_<budget metric>`` from its rows ``steps`` / ``best_step`` / ``stopped_early`` / ``train_loss`` of the
    same case. ``valid`` (``comparators(table)``): only valid comparators are compared; a case without one is
    ``NO_VERDICT``, its ``note`` saying why. Partner-based edits go to ``controls``.
    """
    global_maps = tuple(global_maps)
    sign = _sign(metric, higher_is_better)
    data = _filtered(table, keep)
    names = {f"{metric}_gap_{g}": g for g in global_maps}
    budget_cols = [f"{g}_{b}" for g in global_maps for b in budget_metrics]
    columns = KEY + ["metric", "versus", "gap", "ci_low", "ci_high", "n", "tolerance", "outcome", "compared",
                     "note"] + budget_cols
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
    return _split(out.reset_index()[columns], controls)


# -- counting ------------------------------------------------------------------------------------------------

def _verdict(counts: dict[str, int], rule: str, max_inconclusive_share: float) -> str:
    n = sum(counts.values())
    if n == 0:
        return INCONCLUSIVE
    if rule == "all":
        if counts[FAILS]:
            return FAILS
        return HOLDS if counts[INCONCLUSIVE] <= max_inconclusive_share * n else INCONCLUSIVE
    if counts[HOLDS] > n / 2:
        return HOLDS
    return FAILS if counts[FAILS] >= n / 2 else INCONCLUSIVE


def count_outcomes(cases: pd.DataFrame, column: str = "outcome", by: str = "family", rule: str = "all",
                   max_inconclusive_share: float = 0.0) -> pd.DataFrame:
    """Returns per ``by`` group and ``overall`` (last row): cases, how many hold / do not hold / are inconclusive,
    and the group's verdict.

    ``rule="all"`` (a claim about every case, like claim 1's "for all considered transformations"): does not
    hold when any case does not hold; holds when none fails and at most ``max_inconclusive_share`` of the cases
    are inconclusive (default 0: every case holds); else inconclusive. ``rule="most"`` (a claim about what
    happens "typically"): holds when more than half of the cases hold; does not hold when at least half do
    not; else inconclusive. A group without cases is inconclusive. ``overall`` pools every case.
    Cases marked ``NO_VERDICT`` (the rule could not be applied) are counted in their own column and left out of
    ``cases`` and the verdict; a group of such cases alone has the verdict ``NO_VERDICT``.
    """
    if rule not in ("all", "most"):
        raise ValueError(f"rule must be 'all' or 'most', got {rule!r}")
    unknown = set(cases[column]) - set(OUTCOMES) - {NO_VERDICT} if len(cases) else set()
    if unknown:
        raise ValueError(f"column {column!r} holds {sorted(map(str, unknown))}, not outcomes {OUTCOMES}")
    groups = list(cases.groupby(by, sort=False)) if len(cases) else []
    rows = []
    for name, part in groups + [("overall", cases)]:
        counts = {o: int((part[column] == o).sum()) if len(part) else 0 for o in OUTCOMES}
        apart = int((part[column] == NO_VERDICT).sum()) if len(part) else 0
        decided = sum(counts.values())
        verdict = NO_VERDICT if apart and not decided else _verdict(counts, rule, max_inconclusive_share)
        rows.append({by: name, "cases": decided, **counts, NO_VERDICT: apart, "verdict": verdict})
    return pd.DataFrame(rows, columns=[by, "cases", *OUTCOMES, NO_VERDICT, "verdict"])


# -- claim 3: what the linear maps look like, layer by layer -------------------------------------------------

GEOMETRY_METRICS = ("delta_wx_share", "delta_bias_share", "delta_erank_frac", "delta_erank_floor_frac")


def _alpha_setting(mapping: str, fixed_prefix: str) -> str:
    return "auto" if mapping == "linear" else mapping.removeprefix(fixed_prefix)


def geometry_table(table: pd.DataFrame, metrics: Iterable[str] = GEOMETRY_METRICS, alpha_col: str = "ridge_alpha",
                   grid: Iterable[float] = RIDGE_GRID, mappings: Iterable[str] | None = None,
                   fixed_prefix: str = "linear_alpha", random_suffix: str = RANDOM_SUFFIX) -> pd.DataFrame:
    """Returns the linear maps' geometry, one row per (backbone, family, manipulation, layer, spatial, mapping,
    metric), with its interval where rows carry one and the random-weights control beside it.

    Descriptive: no verdict. ``mappings`` None: ``linear`` (alpha chosen on validation, ``alpha_setting``
    "auto") and every ``linear_alpha<value>`` (a fixed alpha, ``alpha_setting`` = <value>). ``alpha`` = the
    case's ``alpha_col`` row (for a fixed mapping without one, the value in its name). ``edge_alpha`` flags an
    auto alpha at the edge of ``grid``: the largest value (``edge_side`` "high": the grid should be extended)
    or, when the grid holds no 0, the smallest (``low``); a grid that holds 0 has no lower edge (0 is least
    squares). The backbone ``<name>:random`` is the control: its value, interval and alpha go to ``random_*``
    columns of the pretrained row with the same key; ``backbone`` is the pretrained name. Random rows without
    a pretrained partner keep their own row (``backbone`` with the suffix, ``random_*`` empty).
    """
    grid = sorted(float(a) for a in grid)
    metrics = list(metrics)
    cols = ["backbone", "family", "manipulation", "layer", "spatial", "mapping", "alpha_setting", "metric",
            "value", "ci_low", "ci_high", "n", "alpha", "edge_alpha", "edge_side", "random_value", "random_ci_low",
            "random_ci_high", "random_alpha", "random_edge_alpha"]
    if mappings is None:
        chosen = table["mapping"].eq("linear") | table["mapping"].str.fullmatch(re.escape(fixed_prefix) + r".+")
    else:
        chosen = table["mapping"].isin(list(mappings))
    data = table[chosen]
    key = KEY + ["mapping"]
    values = data[data["metric"].isin(metrics)]
    if values.empty:
        return pd.DataFrame(columns=cols)
    _unique(values, key + ["metric"], "geometry")
    alphas = data[data["metric"] == alpha_col].drop_duplicates(key).set_index(key)["value"]
    out = values[key + ["metric", "value", "ci_low", "ci_high", "n"]].copy()
    out["alpha_setting"] = out["mapping"].map(lambda m: _alpha_setting(m, fixed_prefix))
    alpha = alphas.reindex(pd.MultiIndex.from_frame(out[key])).to_numpy()
    fixed = pd.to_numeric(out["alpha_setting"].where(out["alpha_setting"] != "auto"), errors="coerce").to_numpy()
    out["alpha"] = np.where(np.isnan(alpha), fixed, alpha)
    auto = (out["alpha_setting"] == "auto").to_numpy()
    high = auto & np.isclose(out["alpha"], grid[-1], rtol=1e-6, atol=0)
    low = auto & (grid[0] > 0) & np.isclose(out["alpha"], grid[0], rtol=1e-6, atol=0)
    out["edge_side"] = np.where(high, "high", np.where(low, "low", ""))
    out["edge_alpha"] = high | low
    is_random = out["backbone"].astype(str).str.endswith(random_suffix)
    base = out[~is_random].copy()
    rnd = out[is_random].copy()
    rnd["backbone"] = rnd["backbone"].str.removesuffix(random_suffix)
    joined = base.merge(rnd[key + ["metric", "value", "ci_low", "ci_high", "alpha", "edge_alpha"]].rename(
        columns={"value": "random_value", "ci_low": "random_ci_low", "ci_high": "random_ci_high",
                 "alpha": "random_alpha", "edge_alpha": "random_edge_alpha"}), on=key + ["metric"], how="left")
    partnered = rnd.merge(base[key + ["metric"]], on=key + ["metric"], how="left", indicator=True)
    alone = out[is_random].reset_index(drop=True)[(partnered["_merge"] == "left_only").to_numpy()]
    return pd.concat([joined, alone], ignore_index=True)[cols] if len(alone) else joined[cols]


def geometry_by_family(geometry: pd.DataFrame) -> pd.DataFrame:
    """Returns per (backbone, family, layer, spatial, mapping, alpha_setting, metric): cases, the median, min and
    max over manipulations of the pretrained and random values, and how many cases chose an alpha at the edge."""
    key = ["backbone", "family", "layer", "spatial", "mapping", "alpha_setting", "metric"]
    if geometry.empty:
        return pd.DataFrame(columns=key + ["cases", "median", "min", "max", "random_median", "edge_alpha_cases"])
    g = geometry.groupby(key, sort=False)
    out = pd.DataFrame({"cases": g.size(), "median": g["value"].median(), "min": g["value"].min(),
                        "max": g["value"].max(), "random_median": g["random_value"].median(),
                        "edge_alpha_cases": g["edge_alpha"].sum().astype(int)})
    return out.reset_index()


# -- the one directional statement: linear sufficiency grows with depth -------------------------------------

def _misaligned(rows: pd.DataFrame, misaligned: Iterable) -> pd.Series:
    pairs = {tuple(m) if isinstance(m, (tuple, list)) else (None, m) for m in misaligned}
    hit = rows.apply(lambda r: (r["backbone"], r["layer"]) in pairs or (None, r["layer"]) in pairs, axis=1) \
        if len(rows) else pd.Series([], dtype=bool)
    return hit.astype(bool) & (rows["spatial"] == "applied")


def depth_gap_trend(table: pd.DataFrame, metric: str = "cos_mean", global_maps: Iterable[str] = GLOBAL_MAPS,
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
    reversal: the rise is not monotone). Fewer than ``min_layers`` layers: inconclusive.
    ``valid`` (``comparators(table)``): only valid comparators are compared; a case with fewer than ``min_layers``
    layers that have one is ``NO_VERDICT``, its ``note`` naming the layers without one and why.
    """
    global_maps = tuple(global_maps)
    sign = _sign(metric, higher_is_better)
    order = list(dict.fromkeys(layer_order if layer_order is not None else table["layer"]))
    data = _filtered(table, keep)
    data = data[~_is_control(data["manipulation"], controls)] if len(data) else data
    names = {f"{metric}_gap_{g}": g for g in global_maps}
    gaps = data[data["metric"].isin(list(names)) & (data["mapping"] == mapping)].copy()
    gaps = gaps[~_misaligned(gaps, misaligned).to_numpy()] if len(gaps) else gaps
    gaps = gaps[gaps["layer"].isin(order)]
    per_cols = KEY + ["depth", "versus", "gap", "ci_low", "ci_high", "n"]
    case = ["family", "manipulation", "backbone", "spatial"]
    trend_cols = case + ["layers", "n_layers", "shallow", "deep", "gap_shallow", "gap_deep", "diff", "diff_low",
                         "diff_high", "reversal", "outcome", "note"]
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
        rows.append({**row, "shallow": s["layer"], "deep": e["layer"], "gap_shallow": s["gap"], "gap_deep": e["gap"],
                     "diff": diff, "diff_low": diff_low, "diff_high": diff_high, "reversal": reversal,
                     "outcome": outcome, "note": note})
    return Trend(per, pd.DataFrame(rows, columns=trend_cols))
