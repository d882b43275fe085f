"""Sentences about a results table, computed from it: the book never types a finding by hand."""
from __future__ import annotations

import pandas as pd

from featmap.core.table import comparable_rows
from featmap.report.plots import map_label
from featmap.score.metrics import higher_is_better


def metric_table(table: pd.DataFrame, metric: str = "cos_mean") -> pd.DataFrame:
    """Returns a wide table: rows (layer, manipulation), columns the fitted variants, values the metric."""
    data = table[table["metric"] == metric].copy()
    data["map"] = map_label(data)
    wide = data.pivot_table(index=["layer", "manipulation"], columns="map", values="value", sort=False)
    return wide[list(dict.fromkeys(data["map"]))]


def _beats(data: pd.DataFrame, a: str, b: str, spatial_a: str = "none",
           spatial_b: str = "none") -> tuple[int, int, float]:
    """Returns (cases where mapping a's CI lies above mapping b's mean, cases compared, mean of a - b)."""
    left = data[(data["mapping"] == a) & (data["spatial"] == spatial_a)].set_index(["layer", "manipulation"])
    right = data[(data["mapping"] == b) & (data["spatial"] == spatial_b)].set_index(["layer", "manipulation"])
    common = left.index.intersection(right.index)
    if len(common) == 0:
        return 0, 0, float("nan")
    above = (left.loc[common, "ci_low"] > right.loc[common, "value"]).sum()
    return int(above), len(common), float((left.loc[common, "value"] - right.loc[common, "value"]).mean())


def findings(table: pd.DataFrame, metric: str = "cos_mean") -> str:
    """Returns a short Markdown paragraph stating what the table shows for ``metric``."""
    data = table[table["metric"] == metric].copy()
    if data.empty:
        return f"No {metric} rows in this table."
    data["map"] = map_label(data)
    lines = []
    variants = data[["mapping", "spatial"]].drop_duplicates().itertuples(index=False)
    for mapping, spatial in variants:
        if mapping == "identity":
            continue
        above, total, gain = _beats(data, mapping, "identity", spatial, spatial)
        floor = "the identity floor" + ("" if spatial == "none" else f" (spatial {spatial})")
        if total:
            lines.append(f"- **{mapping}**{'' if spatial == 'none' else f' (spatial {spatial})'} beats {floor} "
                         f"(95% interval above identity's mean) in {above} of {total} (layer, manipulation) "
                         f"cases; mean {metric} gain {gain:+.3f}.")
    comparable = comparable_rows(data)
    globals_ = comparable[comparable["mapping"].isin(["transformer", "transformer_pe"])]
    if not globals_.empty:
        best_global = globals_.groupby(["layer", "manipulation"])["value"].max()
        lin = comparable[comparable["mapping"] == "linear"].set_index(["layer", "manipulation"])["value"]
        common = best_global.index.intersection(lin.index)
        if len(common):
            gap = lin.loc[common] - best_global.loc[common]
            lines.append(f"- Shared linear map minus the better of the two transformers, on the {len(common)} cases "
                         f"where both ran (geometric edits after the grid rotation/flip, other edits as they "
                         f"are): {gap.mean():+.3f} "
                         f"{metric} on average (range {gap.min():+.3f} to {gap.max():+.3f}); the linear map is ahead "
                         f"in {(gap > 0).sum()} of {len(common)}.")
    learned = data[(data["spatial"] == "learned")]
    if not learned.empty:
        pe = learned.pivot_table(index=["layer", "manipulation"], columns="mapping", values="value")
        if {"transformer", "transformer_pe"} <= set(pe.columns):
            diff = (pe["transformer_pe"] - pe["transformer"]).dropna()
            lines.append(f"- Geometric edits on the raw grid (the map must learn the permutation): positional "
                         f"embeddings change the transformer's {metric} by {diff.mean():+.3f} on average over "
                         f"{len(diff)} cases.")
    pick = "idxmax" if higher_is_better(metric) else "idxmin"  # the direction from the metric registry
    best = data.loc[getattr(data.groupby(["layer", "manipulation"])["value"], pick)()]
    counts = best["map"].value_counts()
    lines.append("- Best variant per (layer, manipulation): "
                 + ", ".join(f"{k} {v}x" for k, v in counts.items()) + ".")
    for layer, d in data.groupby("layer", sort=False):
        ident = d[d["map"] == "identity"]
        if not ident.empty:
            hardest = ident.loc[ident["value"].idxmin() if higher_is_better(metric) else ident["value"].idxmax()]
            lines.append(f"- At {layer}, the manipulation that moves features most (lowest identity {metric}) is "
                         f"{hardest['manipulation']} ({hardest['value']:.3f}).")
    geo = data[data["spatial"] != "none"]
    if not geo.empty:
        above, total, gain = _beats(data, "linear", "linear", "applied", "none")
        if total:
            lines.append(f"- Geometric edits: applying the grid rotation/flip before the linear map raises "
                         f"{metric} by {gain:+.3f} on average (interval above the unpermuted map in {above} of "
                         f"{total} cases).")
    return "\n".join(lines)


def layer_findings(table: pd.DataFrame) -> str:
    """Returns Markdown sentences on how the linear maps change with depth, computed from a layers table."""
    from featmap.report.trends import layer_trends

    names = {"wx_share": "weight share ||Wx|| / ||Wx + b||", "bias_share": "bias share ||b|| / ||Wx + b||",
             "erank_frac": "effective rank of W / C (Roy-Vetterli)",
             "delta_erank_frac": "effective rank of W - I / C (Roy-Vetterli)",
             "delta_erank_energy_frac": "effective rank of W - I / C (energy)"}
    trends = layer_trends(table, list(names))
    lines = []
    for _, t in trends.iterrows():
        direction = "rises" if t["last"] > t["first"] else "falls"
        lines.append(f"- {t['backbone']}: {names[t['metric']]} {direction} from {t['first']:.3f} at {t['first_layer']} "
                     f"to {t['last']:.3f} at {t['last_layer']} (Spearman correlation with depth "
                     f"{t['spearman_with_depth']:+.2f}).")
    cos = table[table["metric"] == "cos_mean"].pivot_table(index=["backbone", "layer", "manipulation"],
                                                           columns="mapping", values="value")
    if {"linear", "identity"} <= set(cos.columns):
        gain = (cos["linear"] - cos["identity"]).groupby("backbone").agg(["mean", "min"])
        for backbone, g in gain.iterrows():
            lines.append(f"- {backbone}: the linear map's test cos_mean exceeds identity's by {g['mean']:+.3f} on "
                         f"average over layers and manipulations (smallest gain {g['min']:+.3f}).")
    return "\n".join(lines)


GEOMETRY = ("bias_share", "wx_share", "erank_frac", "delta_erank_frac")


def geometry_by_family(tables: list[pd.DataFrame], metrics: tuple[str, ...] = GEOMETRY) -> pd.DataFrame:
    """Returns the shared linear maps' geometry per (layer, family): the mean over manipulations of each metric
    (geometric edits after the grid permutation), one column per metric, from any number of chapter tables."""
    data = pd.concat(tables, ignore_index=True)
    data = comparable_rows(data[(data["mapping"] == "linear") & data["metric"].isin(metrics)])
    if data.empty:
        raise ValueError(f"no linear-map geometry rows ({', '.join(metrics)}) in the tables")
    order = list(dict.fromkeys(data["layer"]))
    wide = data.pivot_table(index=["layer", "family"], columns="metric", values="value", aggfunc="mean")
    return wide.reindex(columns=[m for m in metrics if m in wide.columns]).sort_index(
        level="layer", key=lambda idx: idx.map(order.index))


def geometry_findings(wide: pd.DataFrame, family: str) -> str:
    """Returns Markdown sentences placing ``family``'s linear maps among the others at each layer, computed from
    ``geometry_by_family``'s table."""
    lines = []
    for layer, d in wide.groupby(level="layer", sort=False):
        d = d.droplevel("layer")
        if family not in d.index:
            continue
        for metric in d.columns:
            ranked = d[metric].sort_values(ascending=False)
            pos = list(ranked.index).index(family) + 1
            others = ", ".join(f"{f} {v:.3f}" for f, v in ranked.items() if f != family)
            lines.append(f"- {layer}, {metric}: {family} {d.loc[family, metric]:.3f}, rank {pos} of {len(ranked)}"
                         + (f" (others: {others})" if others else "") + ".")
    return "\n".join(lines) if lines else f"No {family} rows in the geometry table."
