"""The study's three claims, checked against the results tables: numbers and verdicts computed, never typed.

1. A map can be learned for every manipulation: the fitted maps beat the identity floor (y = x).
2. The shared linear map is close to the best global map (transformer, transformer_pe).
3. Across layers, the linear maps' weight-vs-bias dominance and effective rank change with depth.

Every verdict is one of ``VERDICTS`` and follows from a rule stated in the function's docstring, with the
thresholds as arguments, so a reader can see exactly why a claim holds, holds partly, or does not hold.
"""
from __future__ import annotations

import pandas as pd

from featmap.core.table import comparable_rows
from featmap.maps.base import GLOBAL_MAPS
from featmap.score.metrics import higher_is_better

VERDICTS = ("holds", "holds partly", "does not hold")

# The paper's statements, quoted from its abstract (see shared/paper/seed-summary.txt).
STATEMENTS = {
    1: "We demonstrate the feasibility of learning such mappings for all considered transformations.",
    2: "While global (transformer) models that operate on the full feature map often achieve best results, "
       "the same can be achieved with a shared linear model operating on a single feature vector typically with "
       "very little degradation in reconstruction quality, even for highly non-trivial semantic manipulations.",
    3: "We analyze the corresponding mappings across different feature layers and characterize them according "
       "to dominance of weight vs. bias and the effective rank of the linear transformations.",
}


def verdict(share: float, partly_from: float = 0.5) -> str:
    """Returns 'holds' when ``share`` (of cases that agree with the claim) is 1, 'holds partly' when it is at
    least ``partly_from``, else 'does not hold'; NaN (no cases) is 'does not hold'."""
    if share != share:
        return "does not hold"
    return VERDICTS[0] if share >= 1.0 else VERDICTS[1] if share >= partly_from else VERDICTS[2]


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """Returns the rows where all maps see the same input: geometric edits after the exact grid permutation
    (spatial ``applied``), other edits as they are (``none``)."""
    return comparable_rows(table)


def claim_learnable(table: pd.DataFrame, metric: str = "cos_mean", mapping: str = "linear") -> pd.DataFrame:
    """Returns one row per (family, manipulation, layer): ``mapping``'s metric, its 95% interval, identity's
    value, and whether the interval lies entirely above identity's mean (``beats_identity``).

    The best map of the case (highest value, any map) is listed next to it. Rule per family: the claim holds
    when every case beats identity, partly when at least half do (see ``family_verdicts``).
    """
    data = comparable(table[table["metric"] == metric])
    key = ["family", "manipulation", "layer"]
    ident = data[data["mapping"] == "identity"].set_index(key)["value"].rename("identity")
    fitted = data[data["mapping"] == mapping].set_index(key)[["value", "ci_low", "ci_high"]]
    others = data[~data["mapping"].isin(["identity", "target"])]
    pick = "idxmax" if higher_is_better(metric) else "idxmin"  # the direction from the metric registry
    best = others.loc[getattr(others.groupby(key)["value"], pick)()].set_index(key)
    out = fitted.join(ident, how="inner")
    out["beats_identity"] = out["ci_low"] > out["identity"]
    out["best_map"] = best["mapping"].reindex(out.index)
    out["best_value"] = best["value"].reindex(out.index)
    out["best_beats_identity"] = best["ci_low"].reindex(out.index) > out["identity"]
    return out.reset_index()


def claim_linear_close(table: pd.DataFrame, metric: str = "cos_mean", tolerance: float = 0.02) -> pd.DataFrame:
    """Returns one row per (family, manipulation, layer): the linear map minus the better global map on
    ``metric`` (paired per-sample gap rows ``<metric>_gap_<map>`` of the table) with its 95% paired bootstrap
    interval, and ``close``: the interval's upper end is above ``-tolerance`` (the data cannot rule out a
    degradation smaller than the tolerance; a linear map ahead of both is close too).

    The better global map is the one with the smaller gap (the linear map's hardest comparison).
    """
    gaps = comparable(table[table["metric"].isin([f"{metric}_gap_{g}" for g in GLOBAL_MAPS])
                            & (table["mapping"] == "linear")])
    if gaps.empty:
        return pd.DataFrame(columns=["family", "manipulation", "layer", "versus", "gap", "ci_low", "ci_high",
                                     "close"])
    key = ["family", "manipulation", "layer"]
    hardest = gaps.loc[gaps.groupby(key)["value"].idxmin()].copy()
    hardest["versus"] = hardest["metric"].str.removeprefix(f"{metric}_gap_")
    out = hardest[key + ["versus", "value", "ci_low", "ci_high"]].rename(columns={"value": "gap"})
    out["close"] = out["ci_high"] > -tolerance
    return out.reset_index(drop=True)


def family_verdicts(cases: pd.DataFrame, column: str, partly_from: float = 0.5) -> pd.DataFrame:
    """Returns per family: cases, how many satisfy ``column`` (a boolean), the share, and the verdict."""
    g = cases.groupby("family", sort=False)[column]
    out = pd.DataFrame({"cases": g.size(), "agree": g.sum().astype(int)})
    out["share"] = out["agree"] / out["cases"]
    out["verdict"] = out["share"].map(lambda s: verdict(s, partly_from))
    return out.reset_index()


def claim_layer_trends(table: pd.DataFrame, metrics: tuple[str, ...] = ("bias_share", "wx_share", "erank_frac",
                                                                          "delta_erank_frac"),
                       strong: float = 0.8, weak: float = 0.4) -> pd.DataFrame:
    """Returns per (backbone, metric) of the linear maps: the value at the shallowest and deepest layer (mean over
    manipulations), the Spearman correlation of the per-layer mean with depth, and a verdict on "the metric
    changes systematically with depth": holds when |rho| >= ``strong``, partly when >= ``weak``.

    Backbones with random weights (``<name>:random``) are the control: a trend present only with trained
    weights is a property of what the network learned, not of its architecture.
    """
    from featmap.report.trends import layer_trends

    trends = layer_trends(table, list(metrics))
    if trends.empty:
        return trends
    rho = trends["spearman_with_depth"].abs()
    trends["verdict"] = [VERDICTS[0] if r >= strong else VERDICTS[1] if r >= weak else VERDICTS[2]
                         for r in rho.fillna(0)]
    return trends


def read_all(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Returns the chapters' tables stacked, with a ``chapter`` column (the layers chapter excluded: it is read
    separately for claim 3, and its linear maps repeat the families' cases at more layers)."""
    frames = [t.assign(chapter=name) for name, t in results.items() if name != "layers" and not t.empty]
    if not frames:
        raise ValueError(f"no family results among {sorted(results)}: run the family chapters first")
    return pd.concat(frames, ignore_index=True)


def _sentence_share(fam: pd.DataFrame, what: str) -> str:
    return "; ".join(f"{r.family}: {r.agree} of {r.cases} {what} ({r.verdict})" for r in fam.itertuples())


# Claim 3 names two properties; each is judged by its clearest metric (see ``overall``).
TREND_GROUPS = {"weight vs bias": ("wx_share", "bias_share"), "effective rank": ("erank_frac", "delta_erank_frac")}
NOT_MEASURED = "not measured"


def overall(family_tables: dict[int, pd.DataFrame], trends: pd.DataFrame | None) -> pd.DataFrame:
    """Returns one row per claim: the paper's statement, the measured numbers in words and the verdict.

    ``family_tables``: claim number -> ``family_verdicts`` output (claim 2 may stack several metrics, with a
    ``metric`` column). A claim's overall verdict is its weakest family verdict. Claim 3 (trained weights only):
    each property of ``TREND_GROUPS`` takes the strongest verdict among its metrics, and the claim the weaker of
    the two. A claim with no rows is ``not measured``.
    """
    order = {v: i for i, v in enumerate(VERDICTS)}
    weakest = lambda vs: max(vs, key=order.get) if len(vs) else NOT_MEASURED  # noqa: E731
    out = []
    fam = family_tables.get(1, pd.DataFrame())
    out.append({"claim": 1, "paper": STATEMENTS[1],
                "measured": "best fitted map's 95% interval above identity in " + _sentence_share(fam, "cases")
                if len(fam) else "no family results",
                "verdict": weakest(list(fam.get("verdict", [])))})
    fam = family_tables.get(2, pd.DataFrame())
    parts = [f"{metric}: " + _sentence_share(g, "cases close") for metric, g in fam.groupby("metric", sort=False)] \
        if len(fam) else ["no case where the shared linear map and a global map ran on the same photos"]
    out.append({"claim": 2, "paper": STATEMENTS[2], "measured": " | ".join(parts),
                "verdict": weakest(list(fam.get("verdict", [])))})
    trained = pd.DataFrame() if trends is None or trends.empty else \
        trends[~trends["backbone"].str.endswith(":random")]
    groups = []
    for name, metrics in TREND_GROUPS.items():
        got = trained[trained["metric"].isin(metrics)] if len(trained) else trained
        if len(got):
            best = got.loc[got["verdict"].map(order).idxmin()]
            groups.append((name, best))
    parts = [f"{name}: {t.metric} {t.first:.3f} ({t.first_layer}) to {t.last:.3f} ({t.last_layer}), "
             f"rho {t.spearman_with_depth:+.2f} ({t.verdict})" for name, t in groups]
    out.append({"claim": 3, "paper": STATEMENTS[3], "measured": "; ".join(parts) if parts else "no layers table",
                "verdict": weakest([t.verdict for _, t in groups])})
    return pd.DataFrame(out, columns=["claim", "paper", "measured", "verdict"])


def closeness(table: pd.DataFrame, tolerances: dict[str, float],
              partly_from: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (every case of claim 2 for each metric of ``tolerances``, the per-family verdicts per metric);
    metrics without gap rows in ``table`` are simply absent from both."""
    cases = [claim_linear_close(table, m, t).assign(metric=m) for m, t in tolerances.items()]
    cases = [c for c in cases if not c.empty]
    if not cases:
        empty = pd.DataFrame(columns=["family", "cases", "agree", "share", "verdict", "metric"])
        return pd.DataFrame(columns=["family", "manipulation", "layer", "versus", "gap", "ci_low", "ci_high",
                                     "close", "metric"]), empty
    gaps = pd.concat(cases, ignore_index=True)
    verdicts = pd.concat([family_verdicts(g, "close", partly_from).assign(metric=m)
                          for m, g in gaps.groupby("metric", sort=False)], ignore_index=True)
    return gaps, verdicts
