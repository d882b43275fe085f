"""The results table: one row per measured number, one CSV per chapter, every row saying what produced it."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from featmap.core.bootstrap import bootstrap_ci
from featmap.core.io import REPO_ROOT, atomic_write, content_key

COLUMNS = ["family", "manipulation", "backbone", "layer", "mapping", "spatial", "metric", "value", "n",
           "ci_low", "ci_high"]
# What produced a row, beside it in the results file (see ``provenance``): the backbone's weights, the photos, the
# configuration. The file's columns are COLUMNS then these; rows in memory hold COLUMNS only.
PROVENANCE_COLUMNS = ["weights", "photos", "config"]
RESULTS_ENV = "FEATMAP_RESULTS"
# A table written before its provenance was recorded reads as this in every provenance column.
UNRECORDED = "unrecorded"


def results_dir() -> Path:
    """Returns $FEATMAP_RESULTS if set, else ``results/`` at the repository root (whatever the cwd)."""
    return Path(os.environ.get(RESULTS_ENV) or REPO_ROOT / "results")


def row(base: dict, metric: str, value: float, n: int, ci: tuple[float, float] = (np.nan, np.nan)) -> dict:
    """Returns one results row: the identifying columns of ``base`` plus a metric and its value."""
    missing = [c for c in COLUMNS[:6] if c not in base]
    if missing:
        raise ValueError(f"a results row needs {missing}")
    return {**{c: base[c] for c in COLUMNS[:6]}, "metric": metric, "value": float(value), "n": int(n),
            "ci_low": ci[0], "ci_high": ci[1]}


def sample_rows(base: dict, metric: str, per_sample: np.ndarray, n_boot: int, seed: int) -> dict:
    """Returns the row of a per-sample metric: the mean over samples with its bootstrap interval."""
    key = "/".join(str(base[c]) for c in COLUMNS[:6]) + "/" + metric
    return row(base, metric, float(np.mean(per_sample)), len(per_sample),
               bootstrap_ci(per_sample, n_boot, seed, key=key))


# Wall-clock rows: measurements of the machine, not of the maps. They go to results/timings/<chapter>.csv so that
# the same config gives a byte-identical results/<chapter>.csv.
TIMING_METRICS = ("fit_seconds",)


def _short(identity) -> str:
    return content_key(identity)[:16]


def photos_identity(images) -> str:
    """Returns 16 hex digits naming the photos an ``ImageSet`` holds: their ids, bytes (sha256), labels and subjects,
    which decide the split and every number (a subset of a folder is another photo set)."""
    return _short([[p.id, p.sha256, p.label, p.subject] for p in images.photos])


def weights_identity(backbone) -> str:
    """Returns ``<kind>:<16 hex digits>``: how a backbone got its weights (``default``, ``hub``, ``random`` or
    ``checkpoint``) and the hash of the state it loaded (``Backbone.weights_id``; a checkpoint's content hash)."""
    kind = backbone.weights if backbone.weights in ("default", "hub", "random") else "checkpoint"
    return f"{kind}:{backbone.weights_id}"


# Where files go, and the photos' path (their content is the ``photos`` column), say nothing of what a run computed.
_NOT_IDENTITY = ("cache_dir", "images")


def provenance(config, images, backbone, label: str | None = None,
               image_metrics: dict[str, str] | None = None) -> dict[str, dict]:
    """Returns ``{label: {"weights", "photos", "config", "details"}}`` for one run, to pass to ``write_results``.

    ``config`` is the run's ``RunConfig``, ``images`` its ``ImageSet`` (after any subset), ``backbone`` its
    ``Backbone``; ``label`` is the value of the rows' ``backbone`` column (default ``config.backbone``; the layers
    chapter's control is ``<name>:random``). ``config`` in the result is 16 hex digits hashing the configuration's
    values (all but ``cache_dir`` and ``images``) and ``image_metrics`` (``{metric: what computed it, or
    "unavailable: <why>"}`` where the run scores images); ``details`` holds those values and the photo list, which
    ``write_results`` stores beside the table (``results/provenance/``)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IDENTITY}
    setup = {"run_config": values, "image_metrics": image_metrics}
    photo_list = [{"id": p.id, "sha256": p.sha256, "label": p.label, "subject": p.subject} for p in images.photos]
    entry = {"weights": weights_identity(backbone), "photos": photos_identity(images), "config": _short(setup)}
    details = {**setup, "backbone": backbone.name, "weights_given": backbone.weights, "photos": photo_list}
    return {label or config.backbone: {**entry, "details": details}}


def _details_path(config_id: str) -> Path:
    return results_dir() / "provenance" / f"{config_id}.json"


def write_results(table: pd.DataFrame, chapter: str, provenance: dict[str, dict]) -> Path:
    """Writes ``results/<chapter>.csv`` (and its timing rows to ``results/timings/<chapter>.csv``) atomically, each
    row followed by its ``PROVENANCE_COLUMNS``; returns the results file's path.

    ``provenance``: ``{backbone column value: entry}`` from ``provenance`` (merge the dicts of several runs); every
    backbone in ``table`` needs an entry. The entries' details go to ``results/provenance/<config>.json`` first
    (named by content: never rewritten with other content), so a table never names a record that is missing."""
    if list(table.columns) != COLUMNS:
        raise ValueError(f"results table columns must be {COLUMNS}, got {list(table.columns)}")
    missing = sorted(set(table["backbone"]) - set(provenance))
    if missing:
        raise ValueError(f"no provenance for backbone(s) {missing} of the {chapter} table; pass "
                         f"provenance(config, images, backbone, label) for each (given: {sorted(provenance)})")
    for entry in provenance.values():
        blob = json.dumps({**entry["details"], "config": entry["config"], "photos_id": entry["photos"],
                           "weights": entry["weights"]}, sort_keys=True, indent=1, default=str)
        atomic_write(_details_path(entry["config"]), lambda f, blob=blob: f.write(blob.encode()))
    labelled = table.assign(**{c: table["backbone"].map({k: v[c] for k, v in provenance.items()}).astype(object)
                               for c in PROVENANCE_COLUMNS})
    timed = labelled["metric"].isin(TIMING_METRICS)
    path = results_dir() / f"{chapter}.csv"
    for part, target in ((labelled[~timed], path), (labelled[timed], results_dir() / "timings" / f"{chapter}.csv")):
        atomic_write(target, lambda f, part=part: f.write(part.to_csv(index=False, float_format="%.6g").encode()))
    return path


def read_results(chapter: str) -> pd.DataFrame:
    """Returns the results table of ``chapter`` (``COLUMNS``, then ``PROVENANCE_COLUMNS``: ``unrecorded`` in a
    table written before they were)."""
    path = results_dir() / f"{chapter}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the {chapter} chapter first")
    table = pd.read_csv(path)
    return table.assign(**{c: UNRECORDED for c in PROVENANCE_COLUMNS if c not in table.columns})


def read_provenance(chapters: list[str] | None = None) -> pd.DataFrame:
    """Returns one row per (results table, backbone) in the results folder: ``file``, ``chapter``, ``backbone``,
    ``weights``, ``photos``, ``config`` and ``rows`` (how many rows it holds). ``chapters``: those tables only
    (default: every ``results/*.csv``)."""
    names = chapters if chapters is not None else sorted(p.stem for p in results_dir().glob("*.csv"))
    out = []
    for chapter in names:
        table = read_results(chapter)
        counts = table.groupby(["backbone", *PROVENANCE_COLUMNS], dropna=False).size()
        out += [{"file": str(results_dir() / f"{chapter}.csv"), "chapter": chapter, "backbone": b, "weights": w,
                 "photos": p, "config": c, "rows": int(n)} for (b, w, p, c), n in counts.items()]
    return pd.DataFrame(out, columns=["file", "chapter", "backbone", *PROVENANCE_COLUMNS, "rows"])


def provenance_groups(chapters: list[str] | None = None) -> list[dict]:
    """Returns the tables that belong together: one group per (backbone, weights, photos) recorded in the results
    folder, ``{"backbone", "weights", "photos", "chapters", "files"}``, the groups with most tables first. A table
    with several backbones (the layers chapter's control, the backbones chapter) sits in one group per backbone;
    a table without recorded provenance forms groups of ``unrecorded`` that no recorded table joins."""
    prov = read_provenance(chapters)
    groups = []
    for (backbone, weights, photos), rows in prov.groupby(["backbone", "weights", "photos"], sort=True):
        groups.append({"backbone": backbone, "weights": weights, "photos": photos,
                       "chapters": sorted(set(rows["chapter"])), "files": sorted(set(rows["file"]))})
    return sorted(groups, key=lambda g: -len(g["chapters"]))


def provenance_conflicts(chapters: list[str] | None = None) -> list[str]:
    """Returns one message per backbone that the tables record with different weights or photos (or without any
    record), naming the files; empty when every table that shares a backbone agrees. A page that reads several
    tables together shows these and decides nothing across them."""
    prov = read_provenance(chapters)
    out = []
    for backbone, rows in prov.groupby("backbone", sort=True):
        kinds = rows.groupby(["weights", "photos"], sort=True)["file"].apply(lambda f: sorted(set(f)))
        if len(kinds) > 1 or UNRECORDED in set(rows["weights"]):
            parts = "; ".join(f"weights {w}, photos {p} in {', '.join(files)}" for (w, p), files in kinds.items())
            out.append(f"backbone {backbone} was run with different weights or photos (or unrecorded ones): {parts}; "
                       "rerun those chapters with the same weights and photos, or read them apart")
    return out


def provenance_details(chapter: str) -> dict[str, dict]:
    """Returns ``{backbone: what produced its rows}`` for one results table: the configuration's values, the image
    metrics and their weights (``{metric: identity or "unavailable: <why>"}``), the photo list and the weights, read
    from ``results/provenance/<config>.json``. Empty for a table without recorded provenance."""
    table = read_results(chapter)
    out = {}
    for backbone, config_id in table.drop_duplicates("backbone")[["backbone", "config"]].itertuples(index=False):
        path = _details_path(str(config_id))
        if config_id != UNRECORDED:
            if not path.is_file():
                raise FileNotFoundError(f"{results_dir() / f'{chapter}.csv'} names provenance {config_id}, but {path} "
                                        f"is missing; rerun the {chapter} chapter")
            out[backbone] = json.loads(path.read_text())
    return out


def absent_metrics(chapter: str) -> dict[str, str]:
    """Returns ``{metric: why}`` for the image metrics that were unavailable when ``chapter``'s table was computed
    (its recorded provenance; the same for every backbone of a run), so a page says what its table lacks."""
    out = {}
    for details in provenance_details(chapter).values():
        for name, identity in (details.get("image_metrics") or {}).items():
            if str(identity).startswith("unavailable: "):
                out[name] = str(identity).removeprefix("unavailable: ")
    return out


def comparable_spatial(geometric: bool) -> str:
    """Returns the spatial mode in which every map sees the same input: ``applied`` for geometric edits (after the
    grid rotation/flip), ``none`` for every other edit. The one statement of this rule; runs and reports use it."""
    return "applied" if geometric else "none"


def comparable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Returns the rows of ``table`` in their family's comparable spatial mode (see ``comparable_spatial``)."""
    geometric = table["family"] == "geometric"
    return table[table["spatial"] == geometric.map(comparable_spatial)]
