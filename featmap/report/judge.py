"""The image-space judge's sanity line: a map is judged in image space only where the inverter's image of the true
edited map is recognisably the photo (otherwise no map can be judged there)."""
from __future__ import annotations

import pandas as pd

# The judge's bar: the inverter's image of the true manipulated map must be recognisably that photo.
JUDGE_MIN_REEXTRACT = 0.5


def judge_sanity(table: pd.DataFrame, min_reextract: float = JUDGE_MIN_REEXTRACT) -> pd.DataFrame:
    """Returns per case with image-space rows (backbone, layer, manipulation) whether the image-space judge can see.

    The inverter's image of the TRUE manipulated map (``target`` rows) against the manipulated photo must be
    informative: its ``cos_reextract_median`` (both images back through the backbone) at least ``min_reextract``,
    and its LPIPS interval entirely below an unrelated real photo's (``unrelated`` rows: another test photo
    against the same image). A case that fails gets no image-space verdict: any map is judged there only as
    precisely as the inverter reconstructs the truth (an edit the decoder cannot draw, such as pixel noise,
    fails where the others at the same layer pass).
    """
    cols = ["backbone", "layer", "manipulation", "target_cos_reextract_median", "target_lpips", "unrelated_lpips",
            "judge_ok", "why"]
    rows = table[table["mapping"].isin(["target", "unrelated"])
                 & table["metric"].isin(["cos_reextract_median", "lpips"])]
    out = []
    for (backbone, layer, manip), d in rows.groupby(["backbone", "layer", "manipulation"], sort=False):
        def one(mapping, metric):
            got = d[(d["mapping"] == mapping) & (d["metric"] == metric)]
            return got.iloc[0] if len(got) else None
        reext, target, unrelated = (one("target", "cos_reextract_median"), one("target", "lpips"),
                                    one("unrelated", "lpips"))
        value = float(reext["value"]) if reext is not None else float("nan")
        below = target is not None and unrelated is not None and bool(target["ci_high"] < unrelated["ci_low"])
        why = [f"re-extraction cosine {value:.2f} < {min_reextract}" if not value >= min_reextract else "",
               "" if below else "the true map's image is not clearly closer than an unrelated photo (LPIPS)"]
        out.append({"backbone": backbone, "layer": layer, "manipulation": manip,
                    "target_cos_reextract_median": value,
                    "target_lpips": float(target["value"]) if target is not None else float("nan"),
                    "unrelated_lpips": float(unrelated["value"]) if unrelated is not None else float("nan"),
                    "judge_ok": bool(value >= min_reextract and below), "why": "; ".join(w for w in why if w)})
    return pd.DataFrame(out, columns=cols)


def judge_by_layer(table: pd.DataFrame, min_reextract: float = JUDGE_MIN_REEXTRACT) -> pd.DataFrame:
    """Returns per (backbone, layer) the judge's sanity line in short: the cases it sees of those scored, the mean
    re-extraction cosine and LPIPS (target and unrelated photo) over the cases it sees, and the cases it cannot."""
    cases = judge_sanity(table, min_reextract)
    cols = ["backbone", "layer", "seen", "cases", "target_cos_reextract_median", "target_lpips", "unrelated_lpips",
            "blind"]
    out = []
    for (backbone, layer), d in cases.groupby(["backbone", "layer"], sort=False):
        ok = d[d["judge_ok"]]
        out.append({"backbone": backbone, "layer": layer, "seen": len(ok), "cases": len(d),
                    "target_cos_reextract_median": ok["target_cos_reextract_median"].mean(),
                    "target_lpips": ok["target_lpips"].mean(), "unrelated_lpips": ok["unrelated_lpips"].mean(),
                    "blind": ", ".join(f"{r.manipulation} ({r.why})" for r in d[~d["judge_ok"]].itertuples())})
    return pd.DataFrame(out, columns=cols)
