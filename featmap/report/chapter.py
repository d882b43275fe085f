"""What a chapter page shows, as package calls: the computed key findings first, the main figure, then the
details a reader unfolds. The chapters keep their own prose and parameters; what they share lives here."""
from __future__ import annotations

import html

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML

from featmap.core.table import absent_metrics, comparable_rows
from featmap.maps.base import GLOBAL_MAPS
from featmap.report import claims
from featmap.report.geometry import RANDOM_SUFFIX, geometry_table
from featmap.report.judge import judge_by_layer, judge_sanity
from featmap.report.plots import MAP_COLOURS
from featmap.report.rules import KEY
from featmap.report.verdicts import MAX_TRAIN_EXCESS, comparators

# The maps of a chapter's main figure: at most eight series (the rest are in the folded tables).
MAIN_MAPS = ("identity", "additive", "linear", "local_linear", "mlp", "cnn", "transformer", "transformer_pe")


def _claim_line(c: claims.Claim, what: str) -> str:
    return f"{what}: **{c.verdict}** ({c.counted()}" + (f", {claims.photos_text(c.photos)} per case" if c.photos
                                                       else "") + ")."


def findings_lines(table: pd.DataFrame, min_effect_share: float = 0.1) -> list[str]:
    """Returns the chapter's key findings as short sentences, each computed from ``table`` (a chapter's results):
    the study's claims on this chapter's edits alone (the summary pools the chapters), convergence, semantic
    consistency and the image-space judge."""
    lines = []
    c1 = claims.claim_feasible(table, min_effect_share)
    if len(c1.counts):
        lines.append(_claim_line(c1, f"A map can be learned (the best map chosen on validation photos beats the "
                                     f"no-learning floor by at least {min_effect_share:.0%} of its headroom, on the "
                                     "changed region of local edits)"))
        best = c1.cases["chosen"].dropna()
        if len(best):
            top = best.value_counts()
            lines.append(f"Chosen on validation photos, the best map is {top.index[0]} in {top.iloc[0]} of "
                         f"{len(best)} cases" + (f", then {top.index[1]} ({top.iloc[1]})" if len(top) > 1 else "")
                         + ".")
    if len(c1.controls):
        lines.append(f"Controls (edits that borrow another photo, not learnable by construction): "
                     f"{', '.join(sorted(set(c1.controls['outcome'])))}.")
    c2 = claims.claim_close(table)
    if len(c2.counts):
        lines.append(_claim_line(c2, "The shared linear map is close to the global map that has learned "
                                     "(reconstruction: non-inferiority within 0.02)"))
    sem = claims.claim_semantic(table)
    if len(sem.counts):
        lines.append(_claim_line(sem, "Semantic consistency, linear against global (JSD within 0.02 bits)"))
    lines += convergence_lines(table)
    agree = table[(table["metric"] == "top1_agree") & table["mapping"].isin(["identity", "linear"])]
    agree = comparable_rows(agree)
    if agree.empty and len(table):
        lines.append(f"No semantic-consistency rows: {', '.join(sorted(set(table['backbone'])))} has no classifier "
                     "head here (or semantic_layers selects no layer), so predicted maps are not classified.")
    if len(agree):
        m = agree.groupby("mapping")["value"].mean()
        lines.append(f"Through the classifier tail, the linear map's prediction keeps the true manipulated map's top-1 "
                     f"class for {m.get('linear', np.nan):.0%} of test photos on average (identity: "
                     f"{m.get('identity', np.nan):.0%}).")
    for r in judge_by_layer(table).itertuples():
        sees = (f"it sees {r.seen} of {r.cases} edits (re-extraction cosine {r.target_cos_reextract_median:.2f}, "
                f"LPIPS {r.target_lpips:.2f} against {r.unrelated_lpips:.2f} for an unrelated photo)" if r.seen else
                f"it sees none of {r.cases} edits")
        lines.append(f"Image-space judge at {r.layer}: {sees}" + (
            f"; no image-space verdict for the edits it cannot draw recognisably: {r.blind}." if r.blind else "."))
    return lines


TRAINED_FACTS = ("steps", "best_step", "stopped_early", "train_loss", "best_val_loss")
CLOSE_TO_CLOSED_FORM = 0.02  # linear_sgd counts as reaching the closed form within this share of its validation loss


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


def convergence_lines(table: pd.DataFrame) -> list[str]:
    """Returns the key findings on the trained maps' convergence, computed from ``table``: how many fits stopped
    early, which global maps count as comparators, how often the linear start was kept, linear_sgd against the
    closed form, and the positive control on the raw grid."""
    fits = convergence(table)
    if fits.empty:
        return []
    lines = []
    per_map = fits.groupby("mapping", sort=False)["stopped_early"].agg(lambda s: f"{int((s == 1).sum())}/{len(s)}")
    lines.append(f"Trained maps stopped early (the validation loss stopped improving before the step cap) in "
                 f"{int((fits['stopped_early'] == 1).sum())} of {len(fits)} fits: "
                 + ", ".join(f"{m} {n}" for m, n in per_map.items()) + ".")
    valid = comparators(comparable_rows(table))
    if len(valid):
        cases = valid.groupby(KEY)["valid"].any()
        kept = fits[fits["mapping"].isin(GLOBAL_MAPS) & (fits["best_step"] == 0)]
        started = fits[fits["mapping"].isin(GLOBAL_MAPS)]
        lines.append(f"Global maps valid as comparators (stopped early, training loss at most "
                     f"{MAX_TRAIN_EXCESS:.0%} above the shared linear map's) in {int(cases.sum())} of {len(cases)} "
                     f"cases; {len(kept)} of {len(started)} global fits kept their starting point (best step 0: "
                     "nothing beyond the shared linear map generalised to the validation photos).")
    sgd = fits[(fits["mapping"] == "linear_sgd") & fits["linear_val_loss"].notna()]
    if len(sgd):
        ratio = sgd["best_val_loss"] / sgd["linear_val_loss"] - 1
        done = sgd["stopped_early"] == 1
        close = int((done & (ratio <= CLOSE_TO_CLOSED_FORM)).sum())
        lines.append(f"linear_sgd (the shared linear map by gradient descent, with the closed form's prior) stopped "
                     f"early in {int(done.sum())} of {len(sgd)} cases; its validation loss is within "
                     f"{CLOSE_TO_CLOSED_FORM:.0%} of the closed form's in {close} (median {ratio.median():+.1%}).")
    control = table[(table["spatial"] == "learned") & (table["mapping"] == "linear")
                    & table["metric"].isin([f"cos_mean_gap_{g}" for g in GLOBAL_MAPS])]
    if len(control):
        best = control.assign(gain=-control["value"], low=-control["ci_high"]).sort_values("gain").drop_duplicates(
            ["layer", "manipulation"], keep="last")
        lines.append("Positive control, on the raw grid where the content moves (no grid rotation or flip first): "
                     "the better global map against the shared linear map, test cos_mean "
                     + "; ".join(f"{r.manipulation} {r.metric.removeprefix('cos_mean_gap_')} {r.gain:+.3f} "
                                 f"[{r.low:+.3f}, {-r.ci_low:+.3f}]" for r in best.itertuples())
                     + (" (the global maps follow what a shared linear map cannot)." if (best["low"] > 0).all()
                        else " (where the interval reaches 0, the global map has not learned the move)."))
    return lines


def findings_block(lines: list[str], title: str = "Key findings on this run") -> HTML:
    """Returns a page's key-findings block: ``lines`` (plain text; ``**bold**`` spans kept) as a list in an HTML
    element of class ``key-findings``, the first thing a reader sees after the page's introduction."""
    def item(line: str) -> str:
        parts = html.escape(line).split("**")
        return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    items = "".join(f"<li>{item(line)}</li>" for line in lines)
    return HTML(f'<div class="key-findings"><p><strong>{html.escape(title)}</strong></p><ul>{items}</ul></div>')


def key_findings(table: pd.DataFrame, **kwargs) -> HTML:
    """Returns the key-findings block of a chapter page (an HTML element of class ``key-findings``)."""
    return findings_block(findings_lines(table, **kwargs))


FIGURE_WIDTH = 8.5  # inches: the page's text width at the book's default zoom, so text stays at its set size
FONT = 10           # points: at least the body text's footnote size when the figure is shown at page width


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
    ax.set_yticks(range(len(rows)), rows, fontsize=FONT)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=FONT)
    ax.grid(axis="x", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    return handles


def _figure(n_rows: int):
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, 1.3 + 0.42 * n_rows))
    return fig, ax


def _legend(fig, ax, handles, ncol: int):
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=ncol, frameon=False, fontsize=FONT)
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
    ax.set_xlabel(f"{metric} on test photos at {layer} (95% interval)", fontsize=FONT)
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
    ax.set_xlabel(f"cos_mean on test photos at {layer} (95% interval)", fontsize=FONT)
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
    series = [(f"{m} ({'changed region' if metric == 'cos_changed_mean' else 'whole map'})", f"{m}|{metric}",
               MAP_COLOURS.get(m, "0.3")) for m in present for metric in ("cos_mean", "cos_changed_mean")]
    frame = d.assign(row=d["manipulation"], series=d["mapping"] + "|" + d["metric"])
    handles = _dot_rows(ax, frame, rows, series)
    for h, (_, key, _) in zip(handles, series):
        if key.endswith("|cos_mean"):
            h[0].set_markerfacecolor("white")
    ax.set_xlabel(f"cosine on test photos at {layer} (95% interval)", fontsize=FONT)
    _legend(fig, ax, handles, ncol=2)
    return fig


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
    order = [m for m in MAIN_MAPS + ("procrustes", "linear_sgd") if m in out.columns]
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


def backbone_findings(per_backbone: dict[str, pd.DataFrame], depth: dict[str, claims.Claim]) -> list[str]:
    """Returns the backbones chapter's key findings: per network, claim 3b's headline (its rule, counts and test
    photos), claims 1 and 2 on its cases, and how its global maps converged; a verdict the chapter cannot reach says
    why."""
    lines = []
    for backbone, t in per_backbone.items():
        c1, c2 = claims.claim_feasible(t), claims.claim_close(t, {"cos_mean": 0.02})
        lines.append(f"**{backbone}**: claim 3b (linear sufficiency grows with depth) {depth[backbone].verdict}; "
                     f"claim 1 {c1.verdict} ({c1.counted()}); claim 2 {c2.verdict} ({c2.counted()}).")
        lines.append(depth[backbone].headline().replace("**", ""))
        lines += [f"{backbone}: {line}" for line in convergence_lines(t)[:2]]
    return lines


def image_metrics_note(chapter: str) -> str:
    """Returns which image metrics ``chapter``'s table lacks and why, as recorded when it was computed (markdown),
    or that every one ran."""
    absent = absent_metrics(chapter)
    if absent:
        return "\n".join(f"- `{k}` rows are absent: {why}." for k, why in absent.items())
    return "Every image metric ran."


def paper_quotes(found: list[claims.Claim]) -> str:
    """Returns the paper's own sentence for each claim, quoted apart and labelled as the paper's (markdown)."""
    return "\n\n".join(f"> **The paper, claim {c.claim}:** \"{claims.STATEMENTS[c.claim]}\"" for c in found)


def notes_text(book: claims.Book) -> str:
    """Returns what the summary did not pool and why (markdown), with the verdicts of the groups kept apart, or a
    line saying every table belongs together."""
    if not book.notes:
        return f"Every results table was produced by the same backbone, weights and photo set ({book.group})."
    lines = [f"- {n}" for n in book.notes]
    apart = claims.apart_verdicts(book)
    for r in apart.to_dict("records"):
        lines.append(f"- decided apart, {r['tables']} ({r['produced by']}): claim 1 {r['claim 1']}; claim 2 "
                     f"{r['claim 2']}")
    return "\n".join(lines)


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


def layer_findings_lines(table: pd.DataFrame) -> list[str]:
    """Returns the layers chapter's key findings, computed from its table: the linear maps beat identity by
    depth, the bias part of the predicted change, delta erank against its noise floor, the random-weights
    control, alphas at the grid's edge, and where the grid operation does not line up with the features."""
    lines = []
    trained = table[~table["backbone"].str.endswith(RANDOM_SUFFIX)]
    cos = comparable_rows(trained[trained["metric"] == "cos_mean"]).pivot_table(
        index=["layer", "manipulation"], columns="mapping", values="value", sort=False)
    if {"linear", "identity"} <= set(cos.columns):
        gain = (cos["linear"] - cos["identity"]).groupby(level="layer", sort=False).mean()
        lines.append("The shared linear map's test cos_mean gain over identity, mean over edits, by layer: "
                     + ", ".join(f"{layer} {g:+.3f}" for layer, g in gain.items()) + ".")
    geo = geometry_table(table)
    auto = geo[(geo["alpha_setting"] == "auto")]
    bias = auto[auto["metric"] == "delta_bias_share"].groupby("layer", sort=False)["value"].median()
    if len(bias):
        lines.append("Bias part of the predicted change (delta_bias_share, median over edits): "
                     + ", ".join(f"{layer} {b:.2f}" for layer, b in bias.items()) + "; random weights: "
                     + ", ".join(f"{layer} {b:.2f}" for layer, b in auto[auto["metric"] == "delta_bias_share"]
                                 .groupby("layer", sort=False)["random_value"].median().items()) + ".")
    low, n = claims.low_rank_share(geo)
    if n:
        lines.append(f"The change W - I has lower effective rank than its noise floor (the same fit on pairs whose "
                     f"change belongs to another photo) in {low} of {n} cases.")
    edges = auto[(auto["metric"] == "delta_bias_share") & auto["edge_alpha"].astype(bool)]
    lines.append(f"{len(edges)} fit{'s' if len(edges) > 1 else ''} chose the largest ridge strength of the grid "
                 "(the geometry there is the prior's as much as the data's; the fixed-alpha rows beside are not)."
                 if len(edges) else
                 "No fit chose a ridge strength at the grid's edge.")
    align = trained[(trained["mapping"] == "grid_op") & (trained["metric"] == "align_plain_is_best")]
    if len(align):
        off = align[align["value"] < 1].groupby("layer", sort=False)["manipulation"].apply(list)
        lines.append("The grid rotation/flip lines up with the edited photo's features at every stage." if off.empty
                     else "The grid operation is off by a cell (a shifted copy matches better) at "
                     + "; ".join(f"{layer} ({', '.join(m)})" for layer, m in off.items())
                     + ": the padding of stride-2 convolutions is asymmetric there, so those stages are left out of "
                       "depth trends for geometric edits.")
    return lines


def layer_key_findings(table: pd.DataFrame) -> HTML:
    """Returns the layers chapter's key-findings block (class ``key-findings``)."""
    return findings_block(layer_findings_lines(table))


def data_key_findings(images, card: pd.DataFrame, split) -> HTML:
    """Returns the data card's key-findings block: how many photos from where, under which licences, how they split
    and which shots of one subject are kept together."""
    sources = card.groupby("source").size().sort_values(ascending=False)
    licences = card.groupby("licence").size().sort_values(ascending=False)
    grouped = [g for g in images.groups if len(g.ids) > 1]
    lines = [f"{len(card)} distinct photos ({images.duplicates} byte-identical duplicates removed), "
             f"{card['bytes'].sum() / 1e6:.1f} MB, from " + ", ".join(f"{s} ({n})" for s, n in sources.items()) + ".",
             "Licences: " + ", ".join(f"{lic} {n}" for lic, n in licences.items()) + ".",
             f"Split by source photo (seed 0): {len(split.train)} train, {len(split.val)} validation, "
             f"{len(split.test)} test; {len(grouped)} groups of shots of one subject "
             f"({sum(len(g.ids) for g in grouped)} photos) stay on one side."]
    return findings_block(lines, "Key findings")
