"""The three-outcome rules every verdict uses, how outcomes are counted into a verdict, and how many photos an
undecided case would need.

``HOLDS`` (the data show it), ``FAILS`` (the data show the opposite, or rule out a worthwhile effect) and
``INCONCLUSIVE`` (the interval cannot decide); ``NO_VERDICT`` marks a case the rule cannot be applied to (a missing
row, no valid comparator), ``NOTHING_TO_LEARN`` a case whose floor leaves nothing to learn: both are counted and
named apart, never in a verdict. Rows are the long results table (family, manipulation, backbone, layer, mapping,
spatial, metric, value, n, ci_low, ci_high); every join key holds backbone and spatial (``KEY``), so two backbones
or two spatial modes never mix. Metric directions come from the metric registry (``score.metrics``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd

from featmap.core.table import comparable_rows
from featmap.edits.editors import EDITORS, is_control
from featmap.score.metrics import higher_is_better as _higher_is_better

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
OUTCOMES = (HOLDS, FAILS, INCONCLUSIVE)
NO_VERDICT = "no verdict"
NOTHING_TO_LEARN = "nothing to learn"
APART = (NO_VERDICT, NOTHING_TO_LEARN)

KEY = ["family", "manipulation", "backbone", "layer", "spatial"]
# Edits whose target depends on a random partner photo: not a function of the original, so negative controls
# (the editors marked ``control``).
CONTROLS = tuple(name for name in EDITORS.names() if is_control(name))
NOT_FITTED = ("identity", "target", "unrelated")  # rows of no fitted map (the floor, the ceiling, a baseline)


class Split(NamedTuple):
    """Cases (the claim is tested on them) and controls (partner-based edits, reported beside, never counted)."""

    cases: pd.DataFrame
    controls: pd.DataFrame


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
    Cases marked ``NO_VERDICT`` (the rule could not be applied) or ``NOTHING_TO_LEARN`` are counted in their own
    columns and left out of ``cases`` and the verdict; a group of such cases alone has the verdict ``NO_VERDICT``.
    """
    if rule not in ("all", "most"):
        raise ValueError(f"rule must be 'all' or 'most', got {rule!r}")
    unknown = set(cases[column]) - set(OUTCOMES) - set(APART) if len(cases) else set()
    if unknown:
        raise ValueError(f"column {column!r} holds {sorted(map(str, unknown))}, not outcomes {OUTCOMES}")
    groups = list(cases.groupby(by, sort=False)) if len(cases) else []
    rows = []
    for name, part in groups + [("overall", cases)]:
        counts = {o: int((part[column] == o).sum()) if len(part) else 0 for o in OUTCOMES}
        apart = {o: int((part[column] == o).sum()) if len(part) else 0 for o in APART}
        decided = sum(counts.values())
        verdict = NO_VERDICT if sum(apart.values()) and not decided else _verdict(counts, rule,
                                                                                   max_inconclusive_share)
        rows.append({by: name, "cases": decided, **counts, **apart, "verdict": verdict})
    return pd.DataFrame(rows, columns=[by, "cases", *OUTCOMES, *APART, "verdict"])


# -- what it would take --------------------------------------------------------------------------------------

Z_TWO_SIDED_95 = 1.959964  # the intervals are 95%
Z_POWER_80 = 0.841621      # the sample size for 80% power
MANY = 100_000             # "more photos than any run here": the estimate sits (almost) on the boundary
# Estimates closer than this to the boundary sit on it: a difference of cosines under 1e-4 is no effect, and an
# interval that narrow (two maps equal to float rounding) gives no usable spread.
RESOLUTION = 1e-4


def photos_to_decide(estimate, ci_low, ci_high, n, boundary) -> np.ndarray | float:
    """Returns the test photos a paired test would need to decide a case at its observed spread: the standard
    sample size n* = ((z_0.975 + z_0.8) * sd / |estimate - boundary|)^2 for 95% intervals and 80% power, with the
    per-photo standard deviation sd = (ci_high - ci_low) / (2 z_0.975) * sqrt(n) read off the case's own interval
    of ``n`` photos, rounded up; ``MANY`` (or more) when the estimate sits on the decision ``boundary`` (within
    ``RESOLUTION``), NaN without an interval. Scalars or arrays (broadcast)."""
    est, low, high, n, bound = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in
                                                     (estimate, ci_low, ci_high, n, boundary)])
    sd = (high - low) / (2 * Z_TWO_SIDED_95) * np.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil(((Z_TWO_SIDED_95 + Z_POWER_80) * sd / np.abs(est - bound)) ** 2)
    need = np.where(np.isfinite(need), np.minimum(need, MANY), np.where(np.isnan(sd), np.nan, MANY))
    need = np.where(np.abs(est - bound) < RESOLUTION, np.where(np.isnan(sd), np.nan, MANY), need)
    return float(need) if need.ndim == 0 else need


def superiority_boundary(effect, min_effect):
    """Returns the boundary a superiority case is undecided against: 0 when the point gain reaches the minimum
    effect (the interval must clear 0 to hold), else the minimum effect (the interval must fall below it)."""
    return np.where(np.asarray(effect, dtype=float) >= np.asarray(min_effect, dtype=float), 0.0, min_effect)


# -- helpers of the case rules ------------------------------------------------------------------------------

def lower_is_better(metric: str) -> bool:
    """Returns whether lower values of ``metric`` are better (the metric registry's direction)."""
    return not _higher_is_better(metric)


comparable = comparable_rows


def sign_of(metric: str, higher_is_better: bool | None = None) -> float:
    """Returns +1 when larger ``metric`` values are better (from the registry unless given), else -1."""
    lower = lower_is_better(metric) if higher_is_better is None else not higher_is_better
    return -1.0 if lower else 1.0


def orient(value, low, high, sign: float):
    """Returns (value, low, high) turned so that higher is better."""
    if sign > 0:
        return value, low, high
    return -value, -high, -low


def is_control_edit(manipulation: pd.Series, controls: Iterable[str] = CONTROLS) -> pd.Series:
    """Returns per row whether the manipulation is a partner-based control (a name in ``controls`` or one of its
    parameterised forms)."""
    controls = tuple(controls)
    return manipulation.map(lambda m: any(m == c or str(m).startswith(c + "_") for c in controls)).astype(bool)


def unique_rows(rows: pd.DataFrame, key: list[str], what: str) -> pd.DataFrame:
    """Returns ``rows`` indexed by ``key``; raises naming the key when two rows share it."""
    dup = rows.duplicated(key, keep=False)
    if dup.any():
        first = rows.loc[dup, key].iloc[0].to_dict()
        raise ValueError(f"{int(dup.sum())} {what} rows share a key, e.g. {first}: stack chapters with distinct "
                         "keys (backbone, spatial) or drop the repeats before deciding")
    return rows.set_index(key)


def split_controls(out: pd.DataFrame, controls: Iterable[str] = CONTROLS) -> Split:
    """Returns (cases, controls) of a frame with a ``manipulation`` column."""
    control = is_control_edit(out["manipulation"], controls) if len(out) else pd.Series([], dtype=bool)
    return Split(out[~control].reset_index(drop=True), out[control].reset_index(drop=True))


def filtered(table: pd.DataFrame, keep: Callable[[pd.DataFrame], pd.DataFrame] | None) -> pd.DataFrame:
    """Returns ``keep(table)``, or ``table`` for None."""
    return table if keep is None else keep(table)

