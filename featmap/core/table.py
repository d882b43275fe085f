"""The results table: one row per measured number, one CSV per chapter (see DESIGN.md)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from featmap.core.bootstrap import bootstrap_ci
from featmap.core.io import REPO_ROOT, atomic_write

COLUMNS = ["family", "manipulation", "backbone", "layer", "mapping", "spatial", "metric", "value", "n",
           "ci_low", "ci_high"]
RESULTS_ENV = "FEATMAP_RESULTS"


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


def write_results(table: pd.DataFrame, chapter: str) -> Path:
    """Writes ``results/<chapter>.csv`` (and its timing rows to ``results/timings/<chapter>.csv``) atomically;
    returns the results file's path."""
    if list(table.columns) != COLUMNS:
        raise ValueError(f"results table columns must be {COLUMNS}, got {list(table.columns)}")
    timed = table["metric"].isin(TIMING_METRICS)
    path = results_dir() / f"{chapter}.csv"
    for part, target in ((table[~timed], path), (table[timed], results_dir() / "timings" / f"{chapter}.csv")):
        atomic_write(target, lambda f, part=part: f.write(part.to_csv(index=False, float_format="%.6g").encode()))
    return path


def read_results(chapter: str) -> pd.DataFrame:
    """Returns the results table of ``chapter``."""
    path = results_dir() / f"{chapter}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the {chapter} chapter first")
    return pd.read_csv(path)


def comparable_spatial(geometric: bool) -> str:
    """Returns the spatial mode in which every map sees the same input: ``applied`` for geometric edits (after the
    grid rotation/flip), ``none`` for every other edit. The one statement of this rule; runs and reports use it."""
    return "applied" if geometric else "none"


def comparable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Returns the rows of ``table`` in their family's comparable spatial mode (see ``comparable_spatial``)."""
    geometric = table["family"] == "geometric"
    return table[table["spatial"] == geometric.map(comparable_spatial)]
