"""Sentences about a results table, computed from it: the book never types a finding by hand."""
from __future__ import annotations

import pandas as pd

from .plots import map_label


def metric_table(table: pd.DataFrame, metric: str = "cos_mean") -> pd.DataFrame:
    """Returns a wide table: rows (layer, manipulation), columns the fitted variants, values the metric."""
    data = table[table["metric"] == metric].copy()
    data["map"] = map_label(data)
    wide = data.pivot_table(index=["layer", "manipulation"], columns="map", values="value", sort=False)
    return wide[list(dict.fromkeys(data["map"]))]


def _beats(data: pd.DataFrame, a: str, b: str, spatial_a: str = "none", spatial_b: str = "none") -> tuple[int, int, float]:
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
    best = data.loc[data.groupby(["layer", "manipulation"])["value"].idxmax()]
    counts = best["map"].value_counts()
    lines.append("- Best variant per (layer, manipulation): "
                 + ", ".join(f"{k} {v}x" for k, v in counts.items()) + ".")
    for layer, d in data.groupby("layer", sort=False):
        ident = d[d["map"] == "identity"]
        if not ident.empty:
            hardest = ident.loc[ident["value"].idxmin()]
            lines.append(f"- At {layer}, the manipulation that moves features most (lowest identity {metric}) is "
                         f"{hardest['manipulation']} ({hardest['value']:.3f}).")
    geo = data[data["spatial"] != "none"]
    if not geo.empty:
        above, total, gain = _beats(data, "linear", "linear", "applied", "none")
        if total:
            lines.append(f"- Geometric edits: applying the exact grid permutation before the linear map raises "
                         f"{metric} by {gain:+.3f} on average (interval above the unpermuted map in {above} of "
                         f"{total} cases).")
    return "\n".join(lines)
