"""One chapter run: photos -> manipulated views -> cached features -> fitted maps -> results table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featmap.core.progress import bar as progress_bar
from featmap.core.table import COLUMNS, write_results
from featmap.data.images import ImageSet, Split, View
from featmap.edits.manipulations import Manipulation
from featmap.features.store import FeatureStore
from featmap.maps.base import MapOptions
from featmap.maps.data import PairData
from featmap.run.cells import (
    CellScorer,
    gap_rows,
    inverters_for,
    map_identity,
    map_scores,
    photo_scores,
    row_base,
    target_scores,
)
from featmap.run.config import RunConfig
from featmap.run.plan import Plan
from featmap.run.prepare import extract, prepare, views_by_part, views_of
from featmap.run.scores import ScoreCache, results_provenance
from featmap.score.inversion import Inverter
from featmap.train.loop import TrainConfig


@dataclass
class RunResult:
    """What a chapter needs after a run: the table, the split, the feature specs and what it cost."""

    config: RunConfig
    table: pd.DataFrame
    split: Split
    images: ImageSet
    store: FeatureStore
    manipulations: list[Manipulation]
    timings: dict[str, float] = field(default_factory=dict)
    extracted: int = 0
    # (manipulation, layer) -> {"original", "manipulated", "target", map label: uint8 (n, S, S, 3)}
    reconstructions: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    # (manipulation, layer, spatial, map) -> per test photo scores ({metric: (n,)}), in the order of ``tested``
    per_photo: dict[tuple[str, str, str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    tested: dict[str, list[View]] = field(default_factory=dict)  # manipulation -> its test views


def map_options(config: RunConfig, progress: bool = True) -> MapOptions:
    """Returns the mapping options of a chapter run (one place: trained maps are cached under keys built from
    them, so a distributed run and a chapter run must agree)."""
    return MapOptions(ridge=config.ridge, size=config.map_size, start=config.start, device=config.device,
                      cache_dir=config.cache_dir, progress=progress,
                      train=TrainConfig(lr=config.lr, batch_size=config.train_batch, max_steps=config.max_steps,
                                        patience=config.patience, eval_every=config.eval_every,
                                        plateau_steps=config.plateau_steps, max_epochs=config.max_epochs,
                                        seed=config.seed))


def run_chapter(config: RunConfig, write: bool = True, inverters: dict[str, Inverter] | None = None,
                n_examples: int = 2) -> RunResult:
    """Runs every cell of ``config``'s plan (manipulation, layer, spatial mode, maps); writes
    results/<chapter>.csv.

    ``inverters``: {layer: Inverter} to use instead of the default decoder (see ``featmap.score.inversion``);
    ``n_examples``: test photos whose reconstructions are kept for the chapter's figures. Scores are cached by
    content (``featmap.run.scores``): a rerun with the same inputs fits and scores nothing.
    """
    t0 = time.perf_counter()
    images, split, store, manipulations = prepare(config)
    parts = views_by_part(config, split)
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extracted = extract(store, parts, manipulations)
    timings = {"prepare_seconds": prepare_s, "extract_seconds": time.perf_counter() - t0, "stats_seconds": 0.0,
               "fit_seconds": 0.0}
    options = map_options(config)
    t0 = time.perf_counter()
    inverters = inverters_for(config, store, split, inverters)
    timings["inverter_seconds"] = time.perf_counter() - t0
    timings["image_seconds"] = 0.0
    plan = Plan.build(config, manipulations, store.backbone.layers, set(inverters),
                      semantics=getattr(store.backbone, "has_classifier", True))
    cache = ScoreCache(config.cache_dir)
    rows, tails, reconstructions, per_photo, tested = [], {}, {}, {}, {}
    bar = progress_bar(total=len(plan.fits()), desc=f"{config.chapter}: fitting and scoring maps", unit="fit")
    for manip, layer, cells in plan.groups():
        views = views_of(manip, parts)
        n_fit = len(views["train"])  # every map is fit on the training photos only
        group = CellScorer(config, store, manip, layer, views["test"], inverters.get(layer), tails, views["val"])
        tested[manip.name] = views["test"]
        ident = group.identity() if group.cacheable() else None
        semantics = any(c.semantics for c in cells)
        target = cache.get_or_compute(ident and {**ident, "target": semantics, "examples": n_examples,
                                                 "rows": "local_edit"},
                                      lambda: target_scores(config, group, semantics, n_examples))
        rows += target["rows"]
        if group.inverter is not None:
            reconstructions[manip.name, layer] = {k.removeprefix("image/"): v for k, v in target["arrays"].items()}
        for cell in cells:
            data = PairData(store, {"train": views["train"], "val": views["val"]}, manip, layer, cell.spatial,
                            config.batch_size)
            base = row_base(config, manip, layer, cell.spatial, "")
            per_sample: dict[str, dict[str, np.ndarray]] = {}
            for cls in cell.mappings:
                mapping = cls(options)
                key = ident and {**ident, **map_identity(mapping, data, cell), "spatial": cell.spatial,
                                 "semantics": cell.semantics, "images": mapping.name in cell.images,
                                 "examples": n_examples, "rows": "val_cos_changed_mean"}
                got = cache.get_or_compute(key, lambda: map_scores(config, group, cell, mapping, data, n_fit,
                                                                   n_examples, timings, options.train))
                rows += got["rows"]
                per_sample[mapping.name] = photo_scores(got["arrays"])
                per_photo[manip.name, layer, cell.spatial, mapping.name] = per_sample[mapping.name]
                if "image" in got["arrays"]:
                    label = mapping.name if cell.spatial == "none" else f"{mapping.name} ({cell.spatial})"
                    reconstructions[manip.name, layer][label] = got["arrays"]["image"]
                bar.update(1)
            linear_raw = per_photo.get((manip.name, layer, "none", "linear"))
            if cell.spatial == "learned" and linear_raw is not None and "linear" not in per_sample:
                # the positive control: global maps on the raw grid against the shared linear map there, per photo
                per_sample = {"linear": linear_raw, **per_sample}
            rows += gap_rows(base, per_sample, config.bootstrap, config.seed)
    bar.close()
    timings["scores_cached"], timings["scores_computed"] = cache.hits, cache.computed
    table = pd.DataFrame(rows, columns=COLUMNS)
    if write:
        write_results(table, config.chapter, results_provenance(config, images, store.backbone))
    return RunResult(config, table, split, images, store, manipulations, timings, extracted, reconstructions,
                     per_photo, tested)
