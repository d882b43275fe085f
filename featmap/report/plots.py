"""Figures drawn from the results table only (and example images)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from featmap.core.table import comparable_rows
from featmap.maps.base import GLOBAL_MAPS

# Every figure is drawn at most as wide as the page's text column (shown at its own size, never shrunk) with text of
# at least SMALLEST points: the book's footnote size when the figure is shown at page width.
PAGE_WIDTH = 6.7  # inches: the book's content column is 688 px at 1280 px, figures are drawn at 100 dpi
SMALLEST = 9      # points
LABEL = 10        # points: axis labels, ticks and legends of the pages' main figures


def wrapped(title: str, width: int = 15) -> str:
    """Returns ``title`` broken into lines of at most about ``width`` characters at underscores and spaces (a panel
    of a wrapped row is narrow; a long edit name would run into its neighbours)."""
    lines = []
    for part in title.split("\n"):
        line = ""
        for piece in part.replace("_", "_\0").replace(" ", " \0").split("\0"):
            if line and len(line) + len(piece) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
        lines.append(line.rstrip())
    return "\n".join(lines)


def plot_examples(examples: list[tuple[str, list[tuple[str, np.ndarray]]]], per_row: int = 5):
    """Returns a figure: per photo, the original then each manipulated version, wrapped ``per_row`` panels to a row
    so that the page's width holds them at a readable size."""
    rows = []
    for photo_id, panels in examples:
        for start in range(0, len(panels), per_row):
            rows.append((photo_id if start == 0 else "", panels[start:start + per_row]))
    side = PAGE_WIDTH / per_row
    fig, axes = plt.subplots(len(rows), per_row, figsize=(PAGE_WIDTH, (side + 0.55) * len(rows)), squeeze=False)
    for r, (photo_id, panels) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c][1])
                ax.set_title(wrapped(panels[c][0]), fontsize=SMALLEST)
        if photo_id:
            axes[r][0].text(-0.05, 0.5, photo_id.split("/")[-1][:18], transform=axes[r][0].transAxes, rotation=90,
                            ha="right", va="center", fontsize=SMALLEST)
    fig.tight_layout()
    return fig


def plot_cost(table: pd.DataFrame, metric: str = "cos_mean", layer: str | None = None, height: float = 3.4):
    """Returns a figure: mean test ``metric`` per map against its parameter count and its fit time.

    One point per map, averaged over the same cases for every map (geometric edits with the grid permutation
    applied, other edits as they are) at ``layer`` (default: the deepest layer where every map ran); both
    read from the results table's ``n_params`` and ``fit_seconds`` rows.
    """
    data = comparable_rows(table).copy()
    data["map"] = data["mapping"]
    if layer is None:
        counts = data[data["metric"] == metric].groupby("layer")["mapping"].nunique()
        layer = counts[counts == counts.max()].index[-1]
    data = data[data["layer"] == layer]
    wide = data.pivot_table(index=["manipulation", "map"], columns="metric", values="value")
    for needed in (metric, "n_params", "fit_seconds"):
        if needed not in wide:
            raise ValueError(f"no {needed!r} rows at layer {layer}")
    means = wide.groupby("map")[[metric, "n_params", "fit_seconds"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, height), sharey=True)
    palette = dict(zip(means.index, sns.color_palette("colorblind", len(means))))
    for ax, x, label in ((axes[0], "n_params", "parameters"), (axes[1], "fit_seconds", "fit time (s)")):
        for name, r in means.iterrows():
            ax.scatter(max(r[x], 1e-3 if x == "fit_seconds" else 1), r[metric], color=palette[name], s=40)
            ax.annotate(name, (max(r[x], 1e-3 if x == "fit_seconds" else 1), r[metric]), fontsize=SMALLEST,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log scale)", fontsize=10)
        ax.tick_params(labelsize=SMALLEST)
    axes[0].set_ylabel(f"mean test {metric} at {layer}", fontsize=10)
    fig.suptitle(f"Quality against cost, averaged over manipulations ({layer})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_by_layer(table: pd.DataFrame, metrics: list[str], mapping: str = "linear", height: float = 2.8):
    """Returns a seaborn grid, one panel per metric: its value by layer (mean over manipulations of a family,
    band = one standard deviation), one colour per backbone (weights), one line style per family."""
    order = list(dict.fromkeys(table["layer"]))
    data = table[(table["mapping"] == mapping) & table["metric"].isin(metrics)].copy()
    if data.empty:
        raise ValueError(f"no rows for mapping {mapping!r} and metrics {metrics}")
    data["depth"] = data["layer"].map({layer: i for i, layer in enumerate(order)})
    grid = sns.relplot(data=data, x="depth", y="value", hue="backbone", style="family", col="metric",
                       col_order=[m for m in metrics if m in set(data["metric"])], col_wrap=min(2, len(metrics)),
                       kind="line", errorbar="sd", height=height, aspect=1.2, facet_kws={"sharey": False},
                       markers=True)
    for ax in grid.axes.flat:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=45, ha="right", fontsize=SMALLEST)
        ax.tick_params(labelsize=SMALLEST)
        ax.set_xlabel("")
    _fit_width(grid)
    return grid


def plot_truncation(table: pd.DataFrame, height: float = 2.6):
    """Returns a seaborn grid, one panel per layer: test cos_mean of the linear map truncated to its top-k
    directions of W - I, against k (mean over manipulations of a family), with the full map's mean as a line."""
    trunc = table[table["mapping"].str.startswith("linear_rank") & (table["metric"] == "cos_mean")].copy()
    if trunc.empty:
        raise ValueError("no truncated-map rows (mapping linear_rank<k>) in the table")
    trunc["k"] = trunc["mapping"].str.removeprefix("linear_rank").astype(int)
    order = list(dict.fromkeys(table["layer"]))
    grid = sns.relplot(data=trunc, x="k", y="value", hue="backbone", style="family", col="layer", col_order=order,
                       col_wrap=min(3, len(order)), kind="line", errorbar=None, height=height, markers=True)
    full = table[(table["mapping"] == "linear") & (table["metric"] == "cos_mean")]
    for layer, ax in zip(order, grid.axes.flat):
        ax.set_xscale("log", base=2)
        for backbone, d in full[full["layer"] == layer].groupby("backbone"):
            ax.axhline(d["value"].mean(), color="0.6", lw=0.8, ls="--")
    grid.set_axis_labels("k (directions of W - I kept)", "test cos_mean")
    for ax in grid.axes.flat:
        ax.tick_params(labelsize=SMALLEST)
    _fit_width(grid)
    return grid


def plot_gaps(cases: pd.DataFrame, tolerances: dict[str, float], height_per_case: float = 0.32):
    """Returns a figure, one panel per metric stacked down the page: per case (edit and layer, a row) the linear map
    minus the harder global map with its 95% paired interval, coloured by family; the dashed line is minus the
    tolerance, left of it "not close".

    ``cases``: ``claims.claim_close`` cases (one row per case and metric).
    """
    metrics = list(dict.fromkeys(cases["metric"]))
    if not metrics:
        raise ValueError("no gap rows to plot (the linear map and a global map never ran on the same case)")
    sizes = [int((cases["metric"] == m).sum()) for m in metrics]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(PAGE_WIDTH, 0.9 * len(metrics) + height_per_case * sum(sizes)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(n, 2) for n in sizes]})
    families = list(dict.fromkeys(cases["family"]))
    palette = dict(zip(families, sns.color_palette("colorblind", len(families))))
    for ax, metric in zip(axes[:, 0], metrics):
        d = cases[cases["metric"] == metric].reset_index(drop=True)
        for fam in families:
            f = d[d["family"] == fam]
            err = np.vstack([f["gap"] - f["ci_low"], f["ci_high"] - f["gap"]]).clip(min=0)
            ax.errorbar(f["gap"], f.index, xerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, color=palette[fam],
                        label=fam)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.axvline(-tolerances[metric], color="0.3", lw=0.8, ls="--")
        ax.set_yticks(range(len(d)), d["manipulation"] + " " + d["layer"], fontsize=SMALLEST)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=SMALLEST)
        ax.set_title(f"{metric}: linear minus the harder valid global map", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].legend(fontsize=SMALLEST, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def plot_reconstructions(reconstructions: dict, n_photos: int = 1):
    """Returns a figure: one row per (manipulation, layer) and test photo; columns the original, the manipulated
    image, the inverter's image of the true manipulated map ("target") and of each map's prediction, sized to the
    page's width.

    ``reconstructions``: ``RunResult.reconstructions`` ((manipulation, layer) -> {panel: uint8 (n, S, S, 3)}).
    """
    if not reconstructions:
        raise ValueError("no reconstructions: no layer was scored in image space (image_layers)")
    rows = [(key, panels, i) for key, panels in reconstructions.items()
            for i in range(min(n_photos, len(panels["original"])))]
    n_cols = max(len(panels) for _, panels, _ in rows)
    side = PAGE_WIDTH / (n_cols + 0.3)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(PAGE_WIDTH, (side + 0.75) * len(rows)), squeeze=False)
    for r, ((manip, layer), panels, i) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                name = list(panels)[c]
                ax.imshow(panels[name][i])
                ax.set_title(wrapped(name, 10), fontsize=SMALLEST)
        axes[r][0].text(-0.08, 0.5, f"{manip}\n{layer}", transform=axes[r][0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=SMALLEST)
    fig.tight_layout()
    return fig


# One colour per outcome, the same everywhere in the book (from seaborn's colour-blind-safe "colorblind" palette);
# the cases set apart in two light greys.
OUTCOME_COLOURS = {"holds": "#029e73", "does not hold": "#d55e00", "inconclusive": "#bbbbbb",
                   "no verdict": "#e8e8e8", "nothing to learn": "#f4f4f4"}


def plot_outcomes(counts: dict[str, pd.DataFrame], height: float = 0.5):
    """Returns a figure: per claim and family, how many cases hold, do not hold, are inconclusive or are set apart
    (stacked bars from 0); ``counts``: {claim label: ``rules.count_outcomes`` frame} (its ``overall`` row is left
    out)."""
    rows = [(f"{label} ({r['metric']})" if "metric" in r else label, r["family"], r)
            for label, c in counts.items() for r in c.to_dict("records")
            if r["family"] != "overall" and (r["cases"] or any(r.get(k, 0) for k in OUTCOME_COLOURS))]
    if not rows:
        raise ValueError("no cases to plot: no claim was measured")
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 1.0 + height * len(rows)))
    labels = [f"{label} · {family}" for label, family, _ in rows]
    left = np.zeros(len(rows))
    for outcome, colour in OUTCOME_COLOURS.items():
        values = np.array([r.get(outcome, 0) for _, _, r in rows], dtype=float)
        if not values.any():
            continue
        ax.barh(range(len(rows)), values, left=left, color=colour, label=outcome, edgecolor="0.6", linewidth=0.5)
        left += values
    ax.set_yticks(range(len(rows)), labels, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(), 1) * 1.02)
    ax.set_xlabel("cases (edit x layer)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.0 + height * len(rows))), ncol=5, frameon=False,
              fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# One colour per map, the same in every figure of the book (seaborn's colour-blind-safe palette).
MAP_COLOURS = dict(zip(["identity", "additive", "linear", "procrustes", "local_linear", "linear_sgd", "mlp", "cnn",
                        "transformer", "transformer_pe"], sns.color_palette("colorblind", 10).as_hex()))


def plot_by_depth(table: pd.DataFrame, metric: str = "cos_mean", mappings: tuple[str, ...] = ("identity", "linear",
                                                                                                 "transformer"),
                  height: float = 3.0):
    """Returns a figure, one panel per backbone: mean test ``metric`` of ``mappings`` over the manipulations, by
    relative depth (the ``depth`` column: early, middle, late), in each edit's comparable spatial mode."""
    data = comparable_rows(table[(table["metric"] == metric) & table["mapping"].isin(mappings)])
    if data.empty:
        raise ValueError(f"no {metric} rows of {', '.join(mappings)} to plot")
    backbones = list(dict.fromkeys(data["backbone"]))
    fig, axes = plt.subplots(1, len(backbones), figsize=(PAGE_WIDTH, height), sharey=True, squeeze=False)
    order = list(dict.fromkeys(data["depth"]))
    for ax, backbone in zip(axes[0], backbones):
        d = data[data["backbone"] == backbone]
        for name in mappings:
            m = d[d["mapping"] == name].groupby("depth")["value"].mean().reindex(order)
            ax.plot(order, m.to_numpy(), marker="o", color=MAP_COLOURS.get(name), label=name)
        layers = d.drop_duplicates("depth").set_index("depth")["layer"].reindex(order)
        ax.set_xticks(range(len(order)), [f"{o}\n{layer}" for o, layer in layers.items()])
        ax.set_title(backbone, fontsize=10)
        ax.set_xlabel("relative depth (layer)")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_ylabel(f"test {metric} (mean over edits)")
    axes[0][0].legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=len(mappings), frameon=False)
    fig.tight_layout()
    return fig


def plot_headline(families: pd.DataFrame, metric: str = "cos_mean",
                  maps: tuple[str, ...] = ("identity", "linear", "transformer", "transformer_pe"), height: float = 3.0):
    """Returns the book's headline figure, a dot plot: per family, test ``metric`` of the identity floor, the shared
    linear map and the global maps, over the cases where all of them ran (comparable spatial mode): a large dot for
    the mean over cases, small dots for the cases. No bars: the axis need not start at 0."""
    data = comparable_rows(families[(families["metric"] == metric) & families["mapping"].isin(maps)])
    key = ["family", "manipulation", "backbone", "layer"]
    complete = data.groupby(key)["mapping"].nunique()
    complete = complete[complete == len(maps)].index
    data = data.set_index(key).loc[complete].reset_index() if len(complete) else data.iloc[0:0]
    if data.empty:
        raise ValueError(f"no case where {', '.join(maps)} all ran")
    fams = list(dict.fromkeys(data["family"]))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, height))
    step = 0.8 / len(maps)
    for i, name in enumerate(maps):
        d = data[data["mapping"] == name]
        y = np.arange(len(fams)) - 0.4 + step * (i + 0.5)
        for j, fam in enumerate(fams):
            v = d[d["family"] == fam]["value"]
            ax.plot(v, np.full(len(v), y[j]), "|", ms=7, color=MAP_COLOURS[name], alpha=0.55)
        ax.plot(d.groupby("family")["value"].mean().reindex(fams), y, "o", ms=8, color=MAP_COLOURS[name],
                label=name)
    ax.set_yticks(range(len(fams)), fams, fontsize=11)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} on test photos (dot: mean over cases; ticks: cases)", fontsize=10)
    ax.legend(loc="lower left", ncol=len(maps), frameon=False, fontsize=10, bbox_to_anchor=(0, 1.0))
    ax.grid(axis="x", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def plot_best_worst(examples: list[tuple[str, list[tuple[str, np.ndarray]]]]):
    """Returns a figure, one row per edit: the test photo where a map does best (original, edited) and the one
    where it does worst (original, edited), the score in the titles; ``examples`` as ``report.panels.best_and_worst``
    gives them (best then worst for each edit)."""
    rows = [(examples[i], examples[i + 1]) for i in range(0, len(examples) - 1, 2)]
    if not rows:
        raise ValueError("no per-photo scores to show")
    side = PAGE_WIDTH / 4.2
    fig, axes = plt.subplots(len(rows), 4, figsize=(PAGE_WIDTH, (side + 0.6) * len(rows)), squeeze=False)
    for r, (best, worst) in enumerate(rows):
        for c, (_, panels) in enumerate((best, worst)):
            for k, (title, image) in enumerate(panels[:2]):
                ax = axes[r][2 * c + k]
                ax.imshow(image)
                ax.set_title(wrapped(title if k else ("best" if c == 0 else "worst") + ": original", 18),
                             fontsize=SMALLEST)
                ax.axis("off")
    fig.tight_layout()
    return fig


def _fit_width(grid) -> None:
    """Scales a seaborn grid's figure down to the page's width (its fonts are set in points, so they stay)."""
    w, h = grid.figure.get_size_inches()
    if w > PAGE_WIDTH:
        grid.figure.set_size_inches(PAGE_WIDTH, h * PAGE_WIDTH / w)
        grid.figure.tight_layout()


# -- the family chapters' main figures: one message each, rows of dots with their intervals ---------------

def _dot_rows(ax, frame: pd.DataFrame, rows: list[str], series: list[tuple[str, str, str]], value: str = "value"):
    """Draws one row per entry of ``rows`` (frame column ``row``), a dot with its 95% interval per series
    (label, frame key in ``series_col``, colour); returns the legend handles."""
    step = 0.8 / max(len(series), 1)
    handles = []
    for i, (label, key, colour) in enumerate(series):
        d = frame[frame["series"] == key].set_index("row").reindex(rows)
        y = np.arange(len(rows)) - 0.4 + step * (i + 0.5)
        err = np.vstack([d[value] - d["ci_low"], d["ci_high"] - d[value]]).clip(min=0)
        handles.append(ax.errorbar(d[value], y, xerr=np.nan_to_num(err), fmt="o", ms=5, capsize=2, color=colour,
                                   label=label, lw=1))
    ax.set_yticks(range(len(rows)), rows, fontsize=LABEL)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=LABEL)
    ax.grid(axis="x", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    return handles


def _figure(n_rows: int):
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 1.3 + 0.42 * n_rows))
    return fig, ax


def _legend(fig, ax, handles, ncol: int):
    """Puts the legend above the panel in as many columns as fit the page's width (at most ``ncol``): a legend wider
    than the figure would widen the saved image past the page's column, and the page would shrink it."""
    longest = max(len(h.get_label()) for h in handles)
    fits = max(1, int((PAGE_WIDTH - 0.3) // (0.09 * longest + 0.7)))  # inches per entry at 10 points
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=min(ncol, fits), frameon=False,
              fontsize=LABEL)
    fig.tight_layout()


def deepest_trained_layer(table: pd.DataFrame) -> str:
    """Returns the deepest layer where trained maps ran (else the deepest layer of the table)."""
    trained = table[table["metric"] == "steps"]
    layers = list(dict.fromkeys(table["layer"]))
    return list(dict.fromkeys(trained["layer"]))[-1] if len(trained) else layers[-1]


def plot_maps(table: pd.DataFrame, metric: str = "cos_mean", layer: str | None = None,
              maps: tuple[str, ...] = ("identity", "linear", "mlp", "cnn", "transformer", "transformer_pe")):
    """Returns one figure with one message, how close each map comes to the true edited map: per edit (a row), test
    ``metric`` of ``maps`` at ``layer`` (default: the deepest layer where trained maps ran), each edit in its
    comparable mode (geometric edits after the grid rotation/flip), with 95% intervals."""
    layer = layer or deepest_trained_layer(table)
    data = comparable_rows(table[(table["metric"] == metric) & table["mapping"].isin(maps) & (table["layer"] == layer)])
    if data.empty:
        raise ValueError(f"no {metric} rows of {', '.join(maps)} at {layer}")
    rows = list(dict.fromkeys(data["manipulation"]))
    frame = data.assign(row=data["manipulation"], series=data["mapping"])
    fig, ax = _figure(len(rows))
    present = [m for m in maps if m in set(data["mapping"])]
    handles = _dot_rows(ax, frame, rows, [(m, m, MAP_COLOURS.get(m, "0.3")) for m in present])
    ax.set_xlabel(f"{metric} on test photos at {layer} (95% interval)", fontsize=LABEL)
    _legend(fig, ax, handles, ncol=min(len(present), 6))
    return fig


def plot_grid_floor(table: pd.DataFrame, layer: str | None = None):
    """Returns the geometric chapter's figure: per geometric edit, test cos_mean of the identity floor and the shared
    linear map on the raw grid and after the grid rotation or flip, and of the better global map learning the move on
    the raw grid where it ran (the positive control), at ``layer`` (default: the deepest with trained maps)."""
    layer = layer or deepest_trained_layer(table)
    d = table[(table["family"] == "geometric") & (table["metric"] == "cos_mean") & (table["layer"] == layer)]
    parts = [("identity, raw grid", "identity", "none", "#bbbbbb"), ("linear, raw grid", "linear", "none", "#f0b3a0"),
             ("identity after the grid op", "identity", "applied", "0.35"),
             ("linear after the grid op", "linear", "applied", MAP_COLOURS["linear"])]
    frames = [d[(d["mapping"] == m) & (d["spatial"] == s)].assign(series=label) for label, m, s, _ in parts]
    learned = d[(d["spatial"] == "learned") & d["mapping"].isin(GLOBAL_MAPS)]
    if len(learned):
        best = learned.sort_values("value").drop_duplicates("manipulation", keep="last")
        frames.append(best.assign(series="best global map, raw grid"))
        parts.append(("best global map, raw grid", "", "", MAP_COLOURS["transformer_pe"]))
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty:
        raise ValueError(f"no geometric cos_mean rows at {layer}")
    rows = list(dict.fromkeys(frame["manipulation"]))
    fig, ax = _figure(len(rows))
    handles = _dot_rows(ax, frame.assign(row=frame["manipulation"]), rows,
                        [(label, label, colour) for label, _, _, colour in parts])
    ax.set_xlabel(f"cos_mean on test photos at {layer} (95% interval)", fontsize=LABEL)
    _legend(fig, ax, handles, ncol=3)
    return fig


def plot_changed_region(table: pd.DataFrame, layer: str | None = None,
                        maps: tuple[str, ...] = ("identity", "linear", "transformer_pe")):
    """Returns the local edits' figure: per local edit (one that names its region: a painted square, an object
    mask), the whole-map score (cos_mean, hollow) against the score on the positions the edit changed
    (cos_changed_mean, filled) for ``maps`` at ``layer``: the whole map dilutes what a map learns about the changed
    region."""
    layer = layer or deepest_trained_layer(table)
    local = table[(table["mapping"] == "target") & (table["metric"] == "local_edit") & (table["value"] == 1)]
    d = comparable_rows(table[table["metric"].isin(["cos_mean", "cos_changed_mean"]) & table["mapping"].isin(maps)
                              & (table["layer"] == layer) & table["manipulation"].isin(set(local["manipulation"]))])
    if d.empty:
        raise ValueError(f"no cos_mean rows at {layer}")
    rows = list(dict.fromkeys(d["manipulation"]))
    fig, ax = _figure(len(rows))
    present = [m for m in maps if m in set(d["mapping"])]
    series = [(f"{m}: {'changed' if metric == 'cos_changed_mean' else 'whole'}", f"{m}|{metric}",
               MAP_COLOURS.get(m, "0.3")) for m in present for metric in ("cos_mean", "cos_changed_mean")]
    frame = d.assign(row=d["manipulation"], series=d["mapping"] + "|" + d["metric"])
    handles = _dot_rows(ax, frame, rows, series)
    for h, (_, key, _) in zip(handles, series):
        if key.endswith("|cos_mean"):
            h[0].set_markerfacecolor("white")
    ax.set_xlabel(f"cosine on test photos at {layer} (95% interval)", fontsize=LABEL)
    _legend(fig, ax, handles, ncol=2)
    return fig
