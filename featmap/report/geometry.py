"""Claim 3, described: what the shared linear maps look like layer by layer (weight against bias, effective rank),
with the ridge strength each fit chose, the fixed-strength fits and the random-weights control beside. No verdict:
the paper characterises the maps, it states no trend."""
from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from featmap.maps.stats import RIDGE_GRID
from featmap.report.rules import KEY, unique_rows

RANDOM_SUFFIX = ":random"  # the backbone label of the random-weights control's rows


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
    unique_rows(values, key + ["metric"], "geometry")
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


def geometry_summary(geometry: pd.DataFrame) -> pd.DataFrame:
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


def misaligned_stages(layers: pd.DataFrame | None) -> list[tuple[str, str]]:
    """Returns the (backbone, layer) stages where a shifted copy of the grid rotation/flip lines up with the edited
    photo's features better than the plain operation (the layers chapter's ``align_plain_is_best`` rows): geometric
    cases there are left out of depth trends."""
    if layers is None or layers.empty:
        return []
    rows = layers[(layers["mapping"] == "grid_op") & (layers["metric"] == "align_plain_is_best")]
    return sorted({(b, layer) for b, layer, v in zip(rows["backbone"], rows["layer"], rows["value"]) if v < 1})
