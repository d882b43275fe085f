"""A page's key findings: short sentences computed from results tables (never typed), shown first on every page,
and the claims' headlines and the paper's words for the summary and the landing page."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
from IPython.display import HTML

from featmap.core.table import comparable_rows
from featmap.maps.base import GLOBAL_MAPS
from featmap.report import claims
from featmap.report.geometry import RANDOM_SUFFIX, geometry_table
from featmap.report.judge import judge_by_layer
from featmap.report.rules import KEY
from featmap.report.tables import convergence
from featmap.report.verdicts import MAX_TRAIN_EXCESS, comparators


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


CLOSE_TO_CLOSED_FORM = 0.02  # linear_sgd counts as reaching the closed form within this share of its validation loss


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


def findings_block(lines: list[str], title: str | None = "Key findings on this run") -> HTML:
    """Returns a page's key-findings block: ``lines`` (plain text; ``**bold**`` spans kept) as a list in an HTML
    element of class ``key-findings``, the first thing a reader sees after the page's introduction (``title``
    None: no title, where the page's heading says it)."""
    def item(line: str) -> str:
        parts = html.escape(line).split("**")
        return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    items = "".join(f"<li>{item(line)}</li>" for line in lines)
    head = f"<p><strong>{html.escape(title)}</strong></p>" if title else ""
    return HTML(f'<div class="key-findings">{head}<ul>{items}</ul></div>')


def key_findings(table: pd.DataFrame, **kwargs) -> HTML:
    """Returns the key-findings block of a chapter page (an HTML element of class ``key-findings``)."""
    return findings_block(findings_lines(table, **kwargs))


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


def paper_quotes(found: list[claims.Claim]) -> str:
    """Returns the paper's own sentence for each claim, quoted apart and labelled as the paper's (markdown)."""
    def named(c: claims.Claim) -> str:
        return c.title if c.claim == "semantic" else f"claim {c.claim}"
    return "\n\n".join(
        f"> **The paper's revision, paraphrased, on {named(c)}:** {claims.STATEMENTS[c.claim]}."
        if c.claim in claims.PARAPHRASED else f"> **The paper, on {named(c)}:** \"{claims.STATEMENTS[c.claim]}\""
        for c in found)


def notes_text(book: claims.Book) -> str:
    """Returns what the summary did not pool and why (markdown), with the verdicts of the groups kept apart, or a
    line saying every table belongs together."""
    if not book.notes:
        return (f"The family chapters' tables were all produced by the same backbone, weights and photo set "
                f"({book.group}); the layers and backbones chapters are read on their own.")
    lines = [f"- {n}" for n in book.notes]
    apart = claims.apart_verdicts(book)
    for r in apart.to_dict("records"):
        lines.append(f"- decided apart, {r['tables']} ({r['produced by']}): claim 1 {r['claim 1']}; claim 2 "
                     f"{r['claim 2']}")
    return "\n".join(lines)
