"""What a page shows as tables: a results table pivoted for reading, each fit's facts and convergence, the claims'
cases, the edits used, the run's facts; rounded, in a box that scrolls sideways when wide."""
from __future__ import annotations

import numpy as np
import pandas as pd
from IPython.display import HTML

from featmap.core.table import absent_metrics, comparable_rows
from featmap.report import claims
from featmap.report.judge import judge_sanity

# The order of the maps' columns in a page's tables: the floor, the closed forms, then the trained maps.
MAP_ORDER = ("identity", "additive", "linear", "local_linear", "mlp", "cnn", "transformer", "transformer_pe")


TRAINED_FACTS = ("steps", "best_step", "stopped_early", "train_loss", "best_val_loss")


def convergence(table: pd.DataFrame) -> pd.DataFrame:
    """Returns one row per trained fit (case and map) with its convergence rows (steps, best_step, stopped_early,
    train_loss, best_val_loss) and the closed-form linear map's training and validation loss on the same objective
    and pairs beside (``linear_train_loss``, ``linear_val_loss``)."""
    facts = table[table["metric"].isin(TRAINED_FACTS)]
    if facts.empty:
        return pd.DataFrame(columns=["backbone", "layer", "manipulation", "spatial", "mapping", *TRAINED_FACTS,
                                     "linear_train_loss", "linear_val_loss"])
    key = ["backbone", "layer", "manipulation", "spatial"]
    wide = facts.pivot_table(index=key + ["mapping"], columns="metric", values="value", aggfunc="first",
                             sort=False).reset_index()
    linear = wide[wide["mapping"] == "linear"].set_index(key)
    trained = wide[wide["mapping"] != "linear"].copy()
    for col in TRAINED_FACTS:
        if col not in trained:
            trained[col] = np.nan
    for col, new in (("train_loss", "linear_train_loss"), ("best_val_loss", "linear_val_loss")):
        got = linear[col] if col in linear else pd.Series(dtype=float)
        trained[new] = [got.get(k, np.nan) for k in trained[key].itertuples(index=False, name=None)]
    return trained[key + ["mapping", *TRAINED_FACTS, "linear_train_loss", "linear_val_loss"]].reset_index(drop=True)


def converged_only(table: pd.DataFrame) -> pd.DataFrame:
    """Returns ``table`` without the scores of trained fits that ran to their step cap (``stopped_early`` 0): a
    table beside the closed-form maps shows only trained maps that have converged."""
    stopped = table[table["metric"] == "stopped_early"]
    capped = stopped.loc[stopped["value"] < 1, ["backbone", "layer", "manipulation", "spatial", "mapping"]]
    if capped.empty:
        return table
    drop = set(capped.itertuples(index=False, name=None))
    keys = table[["backbone", "layer", "manipulation", "spatial", "mapping"]].itertuples(index=False, name=None)
    return table[[k not in drop for k in keys]]


def wide(table: pd.DataFrame, metric: str, comparable: bool = True) -> pd.DataFrame:
    """Returns ``metric`` as a table with rows (layer, manipulation) and one column per map (comparable mode, or
    the raw grid of geometric edits with ``comparable=False``), without an index column; a trained map's cell is
    empty where its training ran to the step cap (``converged_only``)."""
    data = converged_only(table[table["metric"].isin([metric, "stopped_early"])])
    data = data[data["metric"] == metric]
    data = comparable_rows(data) if comparable else data[(data["family"] == "geometric") & (data["spatial"] == "none")]
    if data.empty:
        return pd.DataFrame()
    out = data.pivot_table(index=["layer", "manipulation"], columns="mapping", values="value", sort=False)
    order = [m for m in MAP_ORDER + ("procrustes", "linear_sgd") if m in out.columns]
    return out[order + [c for c in out.columns if c not in order]].reset_index()


def show(frame: pd.DataFrame, digits: int = 3) -> HTML:
    """Returns ``frame`` as a page shows a table: rounded, no index column, in a box that scrolls sideways when the
    table is wider than the page's column (never clipped)."""
    styled = frame.round(digits).style.hide(axis="index").format(precision=digits)
    return HTML(f'<div class="table-scroll" style="overflow-x: auto; max-width: 100%">{styled.to_html()}</div>')


def run_summary(result) -> str:
    """Returns the run's facts for the folded cell: photos and split, feature maps, what was computed, seconds."""
    split, specs = result.split, result.store.backbone.specs.values()
    t = result.timings
    return "\n".join([
        f"photos: {len(result.images)} ({len(split.train)} train, {len(split.val)} validation, {len(split.test)} "
        "test)",
        "feature maps: " + ", ".join(f"{s.layer} {s.channels}x{s.height}x{s.width}" for s in specs),
        f"images extracted this run: {result.extracted}; scores computed {t.get('scores_computed', 0)}, read from "
        f"the cache {t.get('scores_cached', 0)}",
        "seconds: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in t.items()
                                if k.endswith("_seconds"))])


def judge(table: pd.DataFrame) -> pd.DataFrame:
    """Returns the image-space judge's sanity line per edit and layer (``judge.judge_sanity``) as a page shows it:
    short column names, the backbone column only when there is more than one."""
    out = judge_sanity(table).rename(columns={
        "manipulation": "edit", "target_cos_reextract_median": "re-extraction", "target_lpips": "LPIPS, true map",
        "unrelated_lpips": "LPIPS, unrelated photo", "judge_ok": "sees"})
    return out.drop(columns="backbone") if out["backbone"].nunique() <= 1 else out


IMAGE_COLUMNS = ("ssim", "lpips", "st_lpips", "cos_reextract_median", "ssim_vs_inv_target", "lpips_vs_inv_target",
                 "st_lpips_vs_inv_target", "cos_reextract_median_vs_inv_target")


def image_table(table: pd.DataFrame) -> pd.DataFrame:
    """Returns the image-space scores, one row per (layer, edit, map) including ``target`` and ``unrelated``."""
    data = table[table["metric"].isin(IMAGE_COLUMNS)]
    if data.empty:
        return pd.DataFrame()
    out = data.pivot_table(index=["layer", "manipulation", "mapping"], columns="metric", values="value", sort=False)
    return out[[c for c in IMAGE_COLUMNS if c in out.columns]].reset_index()


FIT_FACTS = ("n_train_positions", "ridge_alpha", "alpha_at_edge", "steps", "best_step", "stopped_early", "train_loss",
             "best_val_loss")


def fit_facts(table: pd.DataFrame) -> pd.DataFrame:
    """Returns per (layer, edit, spatial mode, map) the facts of each fit: training positions, the ridge strength
    chosen on validation photos and whether it sits at the grid's edge; for trained maps the steps run, the kept
    weights' step, whether early stopping ended the training (1) or the cap (0), and the training and validation
    loss at the kept weights (the closed-form linear map's on the same objective beside)."""
    data = table[table["metric"].isin(FIT_FACTS) & ~table["mapping"].isin(["identity", "target", "unrelated"])]
    if data.empty:
        return pd.DataFrame()
    out = data.pivot_table(index=["layer", "manipulation", "spatial", "mapping"], columns="metric", values="value",
                           sort=False)
    return out[[c for c in FIT_FACTS if c in out.columns]].reset_index()


GEOMETRY = ("delta_bias_share", "delta_wx_share", "delta_erank_frac")


def family_geometry(families: pd.DataFrame) -> pd.DataFrame:
    """Returns the shared linear maps' geometry per (backbone, layer, family) of pooled family rows (one group of
    ``claims.read_book``): the median over each family's edits of the predicted change's bias and weight shares and
    of erank(W - I) / C (comparable spatial mode)."""
    data = comparable_rows(families)
    data = data[(data["mapping"] == "linear") & data["metric"].isin(GEOMETRY)]
    if data.empty:
        return pd.DataFrame()
    return data.pivot_table(index=["backbone", "layer", "family"], columns="metric", values="value", aggfunc="median",
                            sort=False).reset_index()


def image_metrics_note(chapter: str) -> str:
    """Returns which image metrics ``chapter``'s table lacks and why, as recorded when it was computed (markdown),
    or that every one ran."""
    absent = absent_metrics(chapter)
    if absent:
        return "\n".join(f"- `{k}` rows are absent: {why}." for k, why in absent.items())
    return "Every image metric ran."


def feasibility_cases(c: claims.Claim) -> pd.DataFrame:
    """Returns claim 1's cases as a page shows them: the floor, the map chosen on validation photos and its paired
    gain, the pre-specified linear map's gain and outcome, the photos needed where undecided, why a case is apart."""
    if c.cases.empty:
        return pd.DataFrame()
    cols = ["family", "manipulation", "layer", "metric", "floor", "chosen", "gain", "gain_low", "gain_high",
            "min_effect", "outcome", "linear_gain", "linear_outcome", "photos_needed", "note"]
    return c.cases[[k for k in cols if k in c.cases]].rename(columns={"manipulation": "edit"})


def closeness_cases(c: claims.Claim) -> pd.DataFrame:
    """Returns the cases of claim 2 or semantic consistency as a page shows them: the metric, the global map
    compared, the paired gap and its interval, the outcome, the photos needed where undecided, why a case is apart."""
    if c.cases.empty:
        return pd.DataFrame()
    cols = ["family", "manipulation", "layer", "metric", "versus", "gap", "ci_low", "ci_high", "n", "outcome",
            "photos_needed", "note"]
    return c.cases[[k for k in cols if k in c.cases]].rename(columns={"manipulation": "edit"})


def depth_cases(c: claims.Claim) -> pd.DataFrame:
    """Returns claim 3b's cases: per edit and backbone the gap at the shallowest and deepest layer, the range of
    their difference, the outcome and the photos needed where undecided."""
    cols = ["family", "manipulation", "backbone", "layers", "gap_shallow", "gap_deep", "diff", "diff_low",
            "diff_high", "outcome", "photos_needed", "note"]
    return c.cases[[k for k in cols if k in c.cases]].rename(columns={"manipulation": "edit"})


def geometry_medians(c: claims.Claim) -> pd.DataFrame:
    """Returns claim 3's medians per (family, layer) of the bias share, the effective rank of W - I and its noise
    floor, at the ridge strength chosen on validation photos."""
    geo = c.cases
    show = geo[(geo["alpha_setting"] == "auto") & geo["metric"].isin(["delta_bias_share", "delta_erank_frac",
                                                                       "delta_erank_floor_frac"])]
    return show.pivot_table(index=["family", "layer"], columns="metric", values="median", sort=False).reset_index()


def edits_used(manipulations) -> pd.DataFrame:
    """Returns per semantic edit: what makes it (a neural network or classical image processing), where it acts
    (the object, the whole photo, or another photo's pixels: a control), the views each split part could edit
    honestly, how many were left out and why (the edits' own skip reasons, counted by kind)."""
    rows = []
    for m in manipulations:
        if not hasattr(m, "usable"):
            continue
        kinds = pd.Series(list(m.skip_kinds().values()), dtype=str).value_counts()
        where = "another photo's pixels (control)" if m.control else "the object" if m.needs_mask else "the whole photo"
        rows.append({"edit": m.name, "made by": m.made_by, "acts on": where,
                     **{part: len(v) for part, v in m.usable.items()}, "left out": len(m.skipped),
                     "why": "; ".join(f"{k} ({n})" for k, n in kinds.items()) or "-"})
    return pd.DataFrame(rows)
