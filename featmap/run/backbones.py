"""Two kinds of network side by side: the same edits and maps on a convolutional and a transformer backbone, at
comparable relative depths (early, middle, late), in one results table."""
from __future__ import annotations

import dataclasses

import pandas as pd

from featmap.core.table import COLUMNS, write_results
from featmap.run.chapter import RunResult, run_chapter
from featmap.run.config import RunConfig
from featmap.run.scores import results_provenance


def relative_depth(layers: list[str]) -> dict[str, str]:
    """Returns {layer: early | middle | late} for three layers given shallow to deep (else depth_1, depth_2, ...)."""
    names = ["early", "middle", "late"] if len(layers) == 3 else [f"depth_{i + 1}" for i in range(len(layers))]
    return dict(zip(layers, names))


def run_backbones(config: RunConfig, second: RunConfig, write: bool = True) -> tuple[pd.DataFrame, list[RunResult]]:
    """Runs ``config`` and ``second`` (the same edits and maps on another backbone and its layers) and returns
    their tables stacked, with each layer's relative depth in ``depth`` beside the results columns (written to
    results/<chapter>.csv without it), and both runs."""
    if second.chapter != config.chapter:
        second = dataclasses.replace(second, chapter=config.chapter)
    runs = [run_chapter(c, write=False) for c in (config, second)]
    table = pd.concat([r.table for r in runs], ignore_index=True)[COLUMNS]
    if write:
        write_results(table, config.chapter, {label: entry for r in runs for label, entry in
                                              results_provenance(r.config, r.images, r.store.backbone).items()})
    depth = {(c.backbone, layer): name for c in (config, second) for layer, name in relative_depth(c.layers).items()}
    return table.assign(depth=[depth.get(k, "") for k in zip(table.backbone, table.layer)]), runs
