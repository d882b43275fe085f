"""How a metric of the linear maps moves with depth, from a results table."""
from __future__ import annotations

import pandas as pd


def layer_trends(table: pd.DataFrame, metrics: list[str], mapping: str = "linear") -> pd.DataFrame:
    """Returns, per backbone and metric, the mean over manipulations at the shallowest and deepest layer and the
    Spearman correlation of the per-layer mean with depth (layer order as in the table)."""
    order = list(dict.fromkeys(table["layer"]))
    out = []
    for (backbone, metric), d in table[(table.mapping == mapping) & table.metric.isin(metrics)].groupby(
            ["backbone", "metric"], sort=False):
        means = d.groupby("layer")["value"].mean().reindex(order).dropna()
        depth = pd.Series(range(len(means)), index=means.index, dtype=float)
        rho = means.corr(depth, method="spearman") if len(means) > 2 else float("nan")
        out.append({"backbone": backbone, "metric": metric, "first_layer": means.index[0],
                    "first": means.iloc[0], "last_layer": means.index[-1], "last": means.iloc[-1],
                    "spearman_with_depth": rho})
    return pd.DataFrame(out)
