"""The study's claims, decided from the results tables and put in words a reader can check: each verdict with its
rule, its counts, its number of test photos, what drives it, whether it depends on the choices made, and what it
would take to decide what is undecided. Nothing is typed by hand.

1. Feasibility: a map can be learned for every manipulation (``verdicts.feasibility``).
2. Reconstruction: the shared linear map is close to the best global map that has learned (``verdicts.closeness``
   on cos_mean, the changed region of local edits, and image metrics where the judge can see).
Semantic consistency: the same comparison through the classifier tail (JSD per photo), its own finding.
3. The linear maps across layers: described (``report.geometry``), not decided.
3b. Linear sufficiency grows with depth (``verdicts.depth_trend``).

Tables are read by what produced them (``read_book``): only rows of one backbone, weights and photo set are
pooled; other tables are named and decided apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from featmap.core.table import PROVENANCE_COLUMNS, UNRECORDED, results_dir
from featmap.report import verdicts as v
from featmap.report.geometry import geometry_summary, geometry_table, misaligned_stages
from featmap.report.judge import judge_sanity
from featmap.report.rules import (
    APART,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_VERDICT,
    count_outcomes,
)

NOT_MEASURED = "not measured"
DESCRIBED = "described"
IMAGE_METRICS = ("ssim", "lpips", "st_lpips", "cos_reextract_median")
FAMILY_CHAPTERS = ("geometric", "masking", "semantic")
# Chapters that repeat the families' cases on other layers or backbones: read for claims 3 and 3b on their own.
NOT_FAMILIES = ("layers", "backbones")

# The paper's own sentences, quoted from its abstract (and, for 3b, its revision's), shown apart from the verdicts.
STATEMENTS = {
    1: "We demonstrate the feasibility of learning such mappings for all considered transformations.",
    2: "While global (transformer) models that operate on the full feature map often achieve best results, "
       "the same can be achieved with a shared linear model operating on a single feature vector typically with "
       "very little degradation in reconstruction quality, even for highly non-trivial semantic manipulations.",
    "semantic": "[We] assess both the reconstruction quality of the mapping as well as the semantic content of the "
                "mapped representations.",
    3: "We analyze the corresponding mappings across different feature layers and characterize them according "
       "to dominance of weight vs. bias and the effective rank of the linear transformations.",
    "3b": "linear sufficiency grows with depth for ConvNeXt and SwinV2 and is less consistent for DINOv3",
}
# How each statement is shown: a quotation, or (the revision's abstract, not at hand verbatim) a paraphrase.
PARAPHRASED = ("3b",)
TITLES = {1: "a map can be learned for every manipulation", 2: "the shared linear map is close to the global map",
          "semantic": "semantic consistency", 3: "the linear maps across layers",
          "3b": "linear sufficiency grows with depth"}
OUTCOME_ORDER = {FAILS: 0, INCONCLUSIVE: 1, HOLDS: 2}


@dataclass
class Claim:
    """One claim on this run: its verdict, the rule in words, the cases (those set apart included, with their
    reason), the controls, the outcome counts, the test photos per case, what drives the verdict, the verdict under
    other reasonable choices and whether it depends on them."""

    claim: int | str
    verdict: str
    rule: str = ""
    cases: pd.DataFrame = field(default_factory=pd.DataFrame)
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)
    counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    photos: tuple[float, float] | None = None
    drivers: str = ""
    robustness: pd.DataFrame = field(default_factory=pd.DataFrame)
    robust: str = ""
    short: str = ""    # the rule in one line, for the landing page
    decided: str = ""  # the cases that decide the verdict, in one sentence

    @property
    def title(self) -> str:
        return TITLES[self.claim]

    @property
    def label(self) -> str:
        """Returns how the claim is named on a page: "Claim N (title)", or the title of a finding with no number."""
        return f"Claim {self.claim} ({self.title})" if self.claim in STATEMENTS and not isinstance(
            self.claim, str) or self.claim == "3b" else self.title.capitalize()

    def counted(self) -> str:
        """Returns the overall counts in words (holds / does not hold / inconclusive, and those set apart), per
        metric where the claim is counted on several."""
        if not len(self.counts):
            return ""
        overall = self.counts[self.counts[self.counts.columns[0]] == "overall"]
        if "metric" in overall and overall["metric"].nunique() > 1:
            return "; ".join(f"{r['metric']}: {counts_text(r)}" for r in overall.to_dict("records"))
        return counts_text(self.counts.iloc[-1])

    def _opening(self, rule: str) -> list[str]:
        """Returns the verdict in bold, then ``rule``, then the counts and the test photos per case."""
        parts = [f"**{self.label}: {self.verdict}.**"] + ([f"Rule: {rule}."] if rule else [])
        if self.counted():
            parts.append(self.counted() + (f", on {photos_text(self.photos)} per case." if self.photos else "."))
        return parts

    def headline(self) -> str:
        """Returns "Claim N: <verdict>." followed by the rule, the counts, the test photos per case, what drives it
        and whether it depends on the choices made (plain text; the verdict in ``**bold**``)."""
        return " ".join(self._opening(self.rule) + [t for t in (self.drivers, self.robust) if t])

    def brief(self) -> str:
        """Returns the landing page's form of ``headline``: the verdict, the rule in one line, the counts and test
        photos, the cases that decide it, and whether other reasonable choices change it (the summary has the
        rest)."""
        parts = self._opening(self.short)
        if self.decided:
            parts.append(self.decided)
        elif self.drivers and not self.counted():
            parts.append(self.drivers)
        if len(self.robustness):
            other = int((self.robustness["verdict"] != self.verdict).sum())
            parts.append(f"Under the {len(self.robustness)} choices of the summary's robustness table: "
                         + (f"{other} give another verdict." if other else "the same verdict."))
        return " ".join(parts)


def counts_text(r) -> str:
    """Returns an ``overall`` (or family) row of ``count_outcomes`` in words."""
    text = f"{r[HOLDS]} of {r['cases']} cases hold, {r[FAILS]} do not, {r[INCONCLUSIVE]} inconclusive"
    apart = [f"{r[k]} {k}" for k in APART if r.get(k, 0)]
    return text + (" (set apart: " + ", ".join(apart) + ")" if apart else "")


def photos_text(photos: tuple[float, float]) -> str:
    low, high = photos
    return f"{low:.0f} test photos" if low == high else f"{low:.0f} to {high:.0f} test photos"


def _photos(cases: pd.DataFrame, column: str = "n") -> tuple[float, float] | None:
    n = pd.to_numeric(cases[column], errors="coerce").dropna() if column in cases else pd.Series(dtype=float)
    return (float(n.min()), float(n.max())) if len(n) else None


def _case_name(r) -> str:
    return f"{r['manipulation']} at {r['layer']}" + (f" ({r['backbone']})" if r.get("_backbones", 1) > 1 else "")


def _needed_text(cases: pd.DataFrame) -> str:
    """Returns what deciding the inconclusive cases would take, from their ``photos_needed``."""
    need = pd.to_numeric(cases.loc[cases["outcome"] == INCONCLUSIVE, "photos_needed"], errors="coerce").dropna()
    if need.empty:
        return ""
    many = need >= 1e5
    tail = (f"; {int(many.sum())} sit on the boundary (no number of photos decides them)" if many.any() else "")
    need = need[~many]
    if need.empty:
        return (f"No number of test photos would decide the {int(many.sum())} inconclusive case"
                f"{'' if many.sum() == 1 else 's'}: {'its' if many.sum() == 1 else 'their'} estimate sits on the "
                "rule's boundary.")
    spread = f"{need.min():.0f}" if need.min() == need.max() else f"{need.min():.0f} to {need.max():.0f}"
    return (f"Deciding the inconclusive cases at their observed spread would take {spread} test photos each (a "
            f"paired test at 95% and 80% power; median {need.median():.0f})" + tail + ".")


def _decided(cases: pd.DataFrame, verdict: str, margin: pd.Series) -> str:
    """Returns, in one sentence, the cases that decide ``verdict``: those that do not hold when it fails, the
    inconclusive ones when it is inconclusive, else the case closest to not holding (the smallest ``margin``: how far
    its interval clears the rule's boundary)."""
    decided = cases[~cases["outcome"].isin(APART)]
    if decided.empty:
        return ""
    named = lambda rows: ", ".join(_case_name(r) for r in rows.to_dict("records"))  # noqa: E731
    if verdict == FAILS:
        text = f"Decided by the cases that do not hold: {named(decided[decided['outcome'] == FAILS].head(8))}."
    elif verdict == INCONCLUSIVE:
        text = f"Undecided: {named(decided[decided['outcome'] == INCONCLUSIVE].head(8))}."
    else:
        holding = decided[decided["outcome"] == HOLDS]
        closest = holding.assign(_margin=margin.reindex(holding.index)).sort_values("_margin").iloc[0]
        text = (f"The case closest to not holding: {_case_name(closest)} (its interval clears the rule's boundary by "
                f"{closest['_margin']:.3f}).")
    return text


def _drivers(cases: pd.DataFrame, verdict: str, margin: pd.Series) -> str:
    """Returns ``_decided`` and what deciding the inconclusive cases would take."""
    decided = cases[~cases["outcome"].isin(APART)]
    return " ".join(t for t in (_decided(cases, verdict, margin), _needed_text(decided) if len(decided) else "")
                    if t)


def _robust(robustness: pd.DataFrame, verdict: str) -> str:
    if robustness.empty:
        return ""
    other = robustness[robustness["verdict"] != verdict]
    if other.empty:
        return f"The verdict is the same under all {len(robustness)} choices of the robustness table."
    choice = "; ".join(", ".join(f"{k} {r[k]}" for k in robustness.columns if k not in ("verdict", "counts"))
                       + f": {r['verdict']}" for r in other.head(4).to_dict("records"))
    return (f"The verdict depends on the choices: {len(other)} of {len(robustness)} give another ({choice}"
            + ("; ..." if len(other) > 4 else "") + ").")


def _mark_backbones(cases: pd.DataFrame) -> pd.DataFrame:
    return cases.assign(_backbones=cases["backbone"].nunique()) if len(cases) else cases


# -- reading the tables ----------------------------------------------------------------------------------------

@dataclass
class Book:
    """The results tables of a book, read together only where they belong together.

    ``families``: the family chapters' rows of the main group (one backbone, weights and photo set: the group
    holding the most family chapters), stacked with a ``chapter`` column; ``group``: that group in words;
    ``apart``: {label: rows} of family rows of other groups, decided apart; ``notes``: what was not pooled or not
    found, in words; ``tables``: every table as read."""

    tables: dict[str, pd.DataFrame]
    families: pd.DataFrame
    group: str
    apart: dict[str, pd.DataFrame]
    notes: list[str]


def _group_of(table: pd.DataFrame) -> pd.Series:
    cols = [c for c in PROVENANCE_COLUMNS if c in table]
    if len(cols) < len(PROVENANCE_COLUMNS):
        return pd.Series(f"{UNRECORDED}", index=table.index)
    return table["backbone"].astype(str) + " | weights " + table["weights"].astype(str) + " | photos " + \
        table["photos"].astype(str)


def read_book(folder: Path | None = None) -> Book:
    """Returns the results tables of ``folder`` (default ``results_dir()``) read together where they belong.

    Rows of the family chapters are grouped by what produced them (backbone, weights, photo set: the provenance
    columns every table carries; a table without them is its own ``unrecorded`` group). The group holding the most
    family chapters (then the most rows) is pooled for the claims; every other group is kept apart, named in
    ``notes`` with its files, and decided apart. A missing family chapter is named too."""
    folder = Path(folder) if folder is not None else results_dir()
    tables = {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}
    notes = [f"no results of the {c} chapter ({c}.csv): its claims are decided without it"
             for c in FAMILY_CHAPTERS if c not in tables]
    frames = [t.assign(chapter=name, _group=_group_of(t)) for name, t in tables.items()
              if name not in NOT_FAMILIES and not t.empty]
    if not frames:
        return Book(tables, pd.DataFrame(), "", {}, notes + ["no family results: run the family chapters"])
    rows = pd.concat(frames, ignore_index=True)
    sizes = rows.groupby("_group").agg(chapters=("chapter", "nunique"), rows=("chapter", "size"))
    main = sizes.sort_values(["chapters", "rows"], ascending=False).index[0]
    apart = {}
    for label, part in rows.groupby("_group", sort=True):
        if label == main:
            continue
        files = ", ".join(f"{c}.csv" for c in sorted(set(part["chapter"])))
        notes.append(f"rows of {label} in {files} were not pooled with the main tables ({main}): decided apart")
        apart[label] = part.drop(columns="_group").reset_index(drop=True)
    families = rows[rows["_group"] == main].drop(columns="_group").reset_index(drop=True)
    return Book(tables, families, main, apart, notes)


# -- claim 1 ---------------------------------------------------------------------------------------------------

MIN_EFFECT_SHARES = (0.0, 0.05, 0.1, 0.2)


def claim_feasible(families: pd.DataFrame, min_effect_share: float = 0.1,
                   nothing_left: float = v.NOTHING_LEFT) -> Claim:
    """Returns claim 1: per case, the best map chosen on validation photos against the no-learning floor, on the
    changed positions of local edits, by at least ``min_effect_share`` of the floor's headroom; cases with nothing
    left to learn set apart; the pre-specified shared linear map beside (``linear_*`` columns). The claim is about
    every manipulation: it holds when every case holds (``count_outcomes(rule="all")``)."""
    if families.empty:
        return Claim(1, NOT_MEASURED)
    main = v.feasibility(families, min_effect_share, "changed", "best", nothing_left)
    if main.cases.empty:
        return Claim(1, NOT_MEASURED, controls=main.controls)
    linear = v.feasibility(families, min_effect_share, "changed", "linear", nothing_left).cases
    beside = linear.set_index(v.KEY)[["gain", "gain_low", "gain_high", "outcome"]].add_prefix("linear_")
    cases = main.cases.join(beside, on=v.KEY)
    counts = count_outcomes(cases, rule="all")
    verdict = counts.iloc[-1]["verdict"]
    rule = (f"in every edit with something left to learn, the best map chosen on validation photos beats the "
            f"no-learning floor (identity; after the grid rotation or flip for geometric edits) photo by photo, by "
            f"at least {min_effect_share:.0%} of the floor's headroom (1 - floor), on the positions the edit "
            f"changed for local edits (masks and object edits) and on the whole map otherwise: a case holds when its "
            f"paired 95% interval lies above 0 and its gain reaches that minimum, does not hold when the interval "
            f"lies below the minimum; a case whose floor is within {nothing_left:g} of the ceiling on validation "
            f"photos, or which no map beats there, has nothing to learn and is set apart")
    robustness = []
    for chosen in ("best", "linear"):
        for region in ("changed", "whole"):
            for share in MIN_EFFECT_SHARES:
                got = main.cases if (chosen, region, share) == ("best", "changed", min_effect_share) else \
                    v.feasibility(families, share, region, chosen, nothing_left).cases
                c = count_outcomes(got, rule="all").iloc[-1]
                robustness.append({"map": "best on validation" if chosen == "best" else "shared linear (pre-specified)",
                                   "score": "changed region of local edits" if region == "changed" else "whole map",
                                   "minimum effect": f"{share:.0%} of headroom", "verdict": c["verdict"],
                                   "counts": counts_text(c)})
    robustness = pd.DataFrame(robustness)
    margin = pd.concat([cases["gain_low"], cases["gain"] - cases["min_effect"]], axis=1).min(axis=1)
    drivers = _drivers(_mark_backbones(cases), verdict, margin)
    linear_counts = count_outcomes(linear, rule="all").iloc[-1]
    drivers += f" The pre-specified shared linear map: {counts_text(linear_counts)} ({linear_counts['verdict']})."
    short = (f"the best map chosen on validation photos beats the no-learning floor by at least {min_effect_share:.0%} "
             "of its headroom, photo by photo (the changed region of local edits; cases with nothing to learn apart)")
    return Claim(1, verdict, rule, cases, main.controls, counts, _photos(cases), drivers.strip(), robustness,
                 _robust(robustness, verdict), short, _decided(_mark_backbones(cases), verdict, margin))


# -- claim 2 and semantic consistency ----------------------------------------------------------------------------

RECONSTRUCTION = {"cos_mean": 0.02, "cos_changed_mean": 0.02, "ssim": 0.02}
TOLERANCES = (0.01, 0.02, 0.05)


def _local_cases(families: pd.DataFrame) -> set:
    rows = families[(families["mapping"] == "target") & (families["metric"] == "local_edit") & (families["value"] == 1)]
    return set(rows[["family", "manipulation", "backbone", "layer"]].itertuples(index=False, name=None))


def _close_on(families: pd.DataFrame, metric: str, tolerance: float, valid: pd.DataFrame,
              seen: set | None) -> tuple[v.Split, str]:
    """Returns (the closeness cases on ``metric``, a note): the changed region on local edits only, image metrics
    only where the judge can see (``seen``: (backbone, layer, manipulation))."""
    data, note = families, ""
    if metric == "cos_changed_mean":
        local = _local_cases(families)
        data = families[[k in local for k in families[["family", "manipulation", "backbone", "layer"]]
                         .itertuples(index=False, name=None)]]
    if metric in IMAGE_METRICS:
        data = families[[k in seen for k in families[["backbone", "layer", "manipulation"]]
                         .itertuples(index=False, name=None)]]
    split = v.closeness(data, metric, tolerance, valid=valid)
    if metric in IMAGE_METRICS and split.cases.empty:
        note = (f"{metric}: no verdict (no global map was scored in image space where the judge can see"
                + (f": {', '.join(sorted({layer for _, layer, _ in seen}))}" if seen else "") + ").")
    return split, note


def _weakest(verdicts: list[str]) -> str:
    decided = [x for x in verdicts if x in OUTCOME_ORDER]
    return min(decided, key=OUTCOME_ORDER.get) if decided else NO_VERDICT


def claim_close(families: pd.DataFrame, tolerances: dict[str, float] | None = None) -> Claim:
    """Returns claim 2 on reconstruction quality: per metric of ``tolerances`` (cos_mean on every case,
    cos_changed_mean on local edits, image metrics where the judge can see), the shared linear map against the harder
    valid global map (``verdicts.comparators``: stopped early, training loss within 1% of the linear map's), paired
    per photo: close when the interval of linear minus global lies above -tolerance. "Typically" is read as more
    than half of the cases (``count_outcomes(rule="most")``); the claim's verdict is the weakest over the metrics
    measured. Cases without a valid comparator get no verdict and are counted apart."""
    tolerances = dict(RECONSTRUCTION if tolerances is None else tolerances)
    if families.empty:
        return Claim(2, NOT_MEASURED)
    valid = v.comparators(families)
    judge = judge_sanity(families)
    seen = {(r.backbone, r.layer, r.manipulation) for r in judge.itertuples() if r.judge_ok}
    cases, controls, counts, notes = [], [], [], []
    for metric, tolerance in tolerances.items():
        split, note = _close_on(families, metric, tolerance, valid, seen)
        notes += [note] if note else []
        if split.cases.empty:
            continue
        cases.append(split.cases)
        controls.append(split.controls)
        counts.append(count_outcomes(split.cases, rule="most").assign(metric=metric))
    if not counts:
        return Claim(2, NOT_MEASURED, drivers=" ".join(notes) or "No case where the shared linear map and a global "
                                                                  "map ran on the same photos.")
    cases, counts = pd.concat(cases, ignore_index=True), pd.concat(counts, ignore_index=True)
    overall_rows = counts[counts["family"] == "overall"]
    verdict = _weakest(list(overall_rows["verdict"]))
    rule = ("per case, the shared linear map against the harder global map that has learned (its training stopped "
            "early and fits its own training pairs at least as well as the linear map, within 1%), photo by photo: "
            "close when the paired 95% interval of linear minus global lies above minus the tolerance ("
            + ", ".join(f"{m} {t:g}" for m, t in tolerances.items()) + "), not close when it lies below; the changed "
            "region is scored on local edits, image metrics where the image-space judge can see; the claim says "
            "\"typically\": it holds on a metric when more than half of the cases hold, and its verdict is the "
            "weakest over the metrics measured")
    per_metric = "; ".join(f"{r['metric']} {r['verdict']}" for r in overall_rows.to_dict("records"))
    drivers = " ".join([f"Per metric: {per_metric}."] + notes)
    decided = cases[~cases["outcome"].isin(APART)]
    if len(decided):
        drivers += " " + _needed_text(decided)
    apart = cases[cases["outcome"] == NO_VERDICT]
    if len(apart):
        drivers += (f" {len(apart)} case-metric pairs have no valid comparator (e.g. {_case_name(apart.iloc[0])}: "
                    f"{apart.iloc[0]['note']}).")
    robustness = []
    for tol in TOLERANCES:
        for label, metrics in (("cos_mean only", ["cos_mean"]), ("all reconstruction metrics", list(tolerances))):
            got = [count_outcomes(_close_on(families, m, tol, valid, seen)[0].cases, rule="most").iloc[-1]
                   for m in metrics if m in tolerances or m == "cos_mean"]
            got = [c for c in got if c["cases"] or any(c[k] for k in APART)]
            robustness.append({"tolerance": f"{tol:g}", "metrics": label,
                               "verdict": _weakest([c["verdict"] for c in got]) if got else NOT_MEASURED,
                               "counts": "; ".join(counts_text(c) for c in got)})
    robustness = pd.DataFrame(robustness)
    short = ("the shared linear map within " + ", ".join(f"{t:g} ({m})" for m, t in tolerances.items())
             + " of the harder global map that has learned, photo by photo, in more than half of the cases")
    return Claim(2, verdict, rule, cases, pd.concat(controls, ignore_index=True), counts, _photos(decided),
                 drivers.strip(), robustness, _robust(robustness, verdict), short,
                 f"Per metric: {per_metric}." + (f" {len(apart)} case-metric pairs have no valid comparator."
                                                 if len(apart) else ""))


def claim_semantic(families: pd.DataFrame, tolerance: float = 0.02) -> Claim:
    """Returns semantic consistency, its own finding: per case, the shared linear map's predicted map and the harder
    valid global map's, each through the classifier tail; the paired per-photo difference of their Jensen-Shannon
    divergence (bits) from the true edited map's class probabilities; close when its interval lies within
    ``tolerance`` bits of no loss; "typically": more than half of the cases."""
    if families.empty or not (families["metric"] == "jsd_gap_transformer").any() and \
            not (families["metric"].astype(str).str.startswith("jsd_gap_transformer")).any():
        return Claim("semantic", NOT_MEASURED, drivers="No semantic-consistency rows (no classifier head, or no "
                                                       "global map where the predictions were classified).")
    valid = v.comparators(families)
    split = v.closeness(families, "jsd", tolerance, valid=valid)
    counts = count_outcomes(split.cases, rule="most")
    verdict = counts.iloc[-1]["verdict"]
    rule = (f"per case, the Jensen-Shannon divergence (bits) between the classifier's probabilities for the "
            f"predicted map and for the true edited map, linear minus the harder valid global map, photo by photo: "
            f"close when the paired 95% interval lies within {tolerance:g} bits of no loss; holds when more than half "
            f"of the cases hold")
    robustness = []
    for tol in TOLERANCES:
        c = count_outcomes(v.closeness(families, "jsd", tol, valid=valid).cases, rule="most").iloc[-1]
        robustness.append({"tolerance (bits)": f"{tol:g}", "verdict": c["verdict"], "counts": counts_text(c)})
    robustness = pd.DataFrame(robustness)
    cases = _mark_backbones(split.cases)
    short = (f"through the classifier tail, the shared linear map's predictions within {tolerance:g} bits (JSD) of the "
             "harder global map's, photo by photo, in more than half of the cases")
    return Claim("semantic", verdict, rule, split.cases, split.controls, counts, _photos(split.cases),
                 _drivers(cases, verdict, cases["ci_low"] + tolerance), robustness, _robust(robustness, verdict),
                 short, _decided(cases, verdict, cases["ci_low"] + tolerance))


# -- claims 3 and 3b -----------------------------------------------------------------------------------------------

def claim_geometry(layers: pd.DataFrame | None) -> Claim:
    """Returns claim 3 (descriptive): the linear maps' geometry per family and layer from the layers table, with
    the noise floor of delta erank, the fixed-alpha fits, the random-weights control and alphas at the grid's
    edge counted. No verdict: the paper characterises, it states no trend."""
    if layers is None or layers.empty:
        return Claim(3, NOT_MEASURED, drivers="No layers table: run the layers chapter.")
    geo = geometry_table(layers)
    summary = geometry_summary(geo)
    auto = summary[(summary["alpha_setting"] == "auto") & ~summary["backbone"].str.endswith(":random")]
    below = low_rank_share(geo)
    edges = int(auto[auto["metric"] == "delta_bias_share"]["edge_alpha_cases"].sum()) if len(auto) else 0
    text = (f"Described, not decided: {len(set(geo['layer']))} layers x {len(set(geo['manipulation']))} edits; the "
            f"change W - I has an effective rank below its noise floor in {below[0]} of {below[1]} cases; {edges} "
            f"fit{'' if edges == 1 else 's'} chose the ridge strength at the grid's edge.")
    return Claim(3, DESCRIBED, "the paper characterises the maps and states no trend, so nothing is decided", summary,
                 drivers=text)


def low_rank_share(geo: pd.DataFrame) -> tuple[int, int]:
    """Returns (cases whose delta erank / C lies below the noise floor's lowest shuffle, cases with both rows):
    "low rank" counted only where it is lower than noise."""
    if geo.empty:
        return 0, 0
    auto = geo[(geo["alpha_setting"] == "auto")]
    key = ["backbone", "family", "manipulation", "layer", "spatial"]
    wide = auto.pivot_table(index=key, columns="metric", values="value", aggfunc="first")
    low = auto[auto["metric"] == "delta_erank_floor_frac"].set_index(key)["ci_low"]
    if "delta_erank_frac" not in wide or low.empty:
        return 0, 0
    both = wide["delta_erank_frac"].dropna().index.intersection(low.dropna().index)
    return int((wide.loc[both, "delta_erank_frac"] < low.loc[both]).sum()), len(both)


MIN_INCREASES = (0.0, 0.01, 0.02)


def claim_depth(table: pd.DataFrame | None, layers: pd.DataFrame | None = None, min_increase: float = 0.0) -> Claim:
    """Returns claim 3b, "linear sufficiency grows with depth", from a table with global maps at three or more
    layers per backbone (the backbones chapter's): per case, whether the linear-minus-best-valid-global gap rises
    from the shallowest to the deepest layer (``verdicts.depth_trend``, a conservative rule on both intervals);
    stages where the grid operation is off by a cell (the layers table's alignment rows) are left out for geometric
    edits. "Typically": more than half of the cases."""
    if table is None or table.empty:
        return Claim("3b", NOT_MEASURED, drivers="No table with global maps at three layers: run the backbones "
                                                  "chapter.")
    misaligned = misaligned_stages(layers)
    valid = v.comparators(table)
    order = list(dict.fromkeys(table["layer"]))
    trend = v.depth_trend(table, layer_order=order, misaligned=misaligned, valid=valid, min_increase=min_increase)
    if trend.trend.empty:
        return Claim("3b", NOT_MEASURED, drivers="No case with global maps at three or more layers.")
    counts = count_outcomes(trend.trend, rule="most")
    verdict = counts.iloc[-1]["verdict"]
    rule = ("per edit and backbone, the gap between the shared linear map and the harder valid global map (photo by "
            "photo, 95% intervals) must rise from the shallowest to the deepest of three or more layers: holds when "
            "the deep interval lies entirely above the shallow one, does not hold when it lies entirely below (the "
            "rise ruled out), else inconclusive; holds when more than half of the cases hold")
    robustness = []
    for inc in MIN_INCREASES:
        got = trend.trend if inc == min_increase else v.depth_trend(
            table, layer_order=order, misaligned=misaligned, valid=valid, min_increase=inc).trend
        c = count_outcomes(got, rule="most").iloc[-1]
        robustness.append({"minimum rise": f"{inc:g}", "verdict": c["verdict"], "counts": counts_text(c)})
    robustness = pd.DataFrame(robustness)
    cases = trend.trend.assign(layer=trend.trend["layers"])
    margin = pd.concat([cases["diff_low"], cases["diff"] - min_increase], axis=1).min(axis=1)
    drivers = _drivers(_mark_backbones(cases), verdict, margin)
    short = ("the gap between the shared linear map and the global map rises from the shallowest to the deepest of "
             "three layers, per edit and network, in more than half of the cases")
    return Claim("3b", verdict, rule, trend.trend, pd.DataFrame(), counts, _photos(trend.trend), drivers, robustness,
                 _robust(robustness, verdict), short, _decided(_mark_backbones(cases), verdict, margin))


# -- a book's claims --------------------------------------------------------------------------------------------------

def decide(book: Book, min_effect_share: float = 0.1, nothing_left: float = v.NOTHING_LEFT,
           tolerances: dict[str, float] | None = None, tolerance_jsd: float = 0.02) -> list[Claim]:
    """Returns the claims of a book: 1, 2 and semantic consistency on its pooled family rows, 3 on the layers table,
    3b on the backbones table."""
    return [claim_feasible(book.families, min_effect_share, nothing_left), claim_close(book.families, tolerances),
            claim_semantic(book.families, tolerance_jsd), claim_geometry(book.tables.get("layers")),
            claim_depth(book.tables.get("backbones"), book.tables.get("layers"))]


def overall(claims: list[Claim]) -> pd.DataFrame:
    """Returns one row per claim: the verdict, its counts in words, the test photos per case and the paper's
    statement (quoted apart)."""
    return pd.DataFrame([{"claim": c.claim, "verdict": c.verdict, "counts": c.counted(),
                          "test photos per case": photos_text(c.photos) if c.photos else "",
                          "paper": STATEMENTS[c.claim]} for c in claims],
                        columns=["claim", "verdict", "counts", "test photos per case", "paper"])


def apart_verdicts(book: Book, min_effect_share: float = 0.1) -> pd.DataFrame:
    """Returns, per group of family rows kept apart (``Book.apart``), its files and the verdicts of claims 1 and 2
    on it alone."""
    out = []
    for label, rows in book.apart.items():
        c1, c2 = claim_feasible(rows, min_effect_share), claim_close(rows)
        out.append({"tables": ", ".join(f"{c}.csv" for c in sorted(set(rows["chapter"]))), "produced by": label,
                    "claim 1": f"{c1.verdict} ({c1.counted()})" if c1.counted() else c1.verdict,
                    "claim 2": f"{c2.verdict} ({c2.counted()})" if c2.counted() else c2.verdict})
    return pd.DataFrame(out, columns=["tables", "produced by", "claim 1", "claim 2"])


__all__ = ["Book", "Claim", "DESCRIBED", "NOT_MEASURED", "STATEMENTS", "apart_verdicts", "claim_close", "claim_depth",
           "claim_feasible", "claim_geometry", "claim_semantic", "decide", "low_rank_share", "overall", "read_book"]
