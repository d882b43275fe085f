"""One chapter run: photos -> manipulated views -> cached features -> fitted maps -> results table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .backbones import Backbone
from .cache import FeatureCache
from .config import RunConfig
from .extraction import FeatureStore
from .images import ImageSet, Split, View
from .manipulations import Manipulation, get_manipulation
from .mappings import LinearStats, get_mapping
from .metrics import FEATURE_METRICS, METRICS
from .results import COLUMNS, row, sample_rows, write_results


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


def spatial_modes(manipulation: Manipulation, config: RunConfig) -> list[str]:
    """Returns the spatial modes to run: the configured ones for geometric edits, ``none`` otherwise."""
    return config.spatial if manipulation.grid_op is not None else ["none"]


def _stats(store: FeatureStore, views: list[View], manipulation: Manipulation, layer: str, spatial: str,
           batch: int) -> LinearStats:
    spec = store.backbone.specs[layer]
    stats = LinearStats(spec.channels, spec.channels)
    for start in range(0, len(views), batch):
        chunk = views[start:start + batch]
        x = store.load(chunk, None, layer)
        if spatial == "applied":
            x = manipulation.grid_op(x)
        stats.update(x, store.load(chunk, manipulation, layer))
    return stats


def prepare(config: RunConfig) -> tuple[ImageSet, Split, FeatureStore, list[Manipulation]]:
    """Returns the photos, split, feature store and manipulations of a run, checking every name first."""
    if config.threads:
        torch.set_num_threads(config.threads)
    manipulations = [get_manipulation(n) for n in config.manipulations]
    images = ImageSet.from_spec(config.images, config.skip_bad_images, config.max_images, config.seed)
    split = images.split(config.test_fraction, config.val_fraction, config.seed)
    backbone = Backbone(config.backbone, config.layers, config.weights, config.image_size, config.device,
                        config.seed)
    for m in manipulations:
        for layer, spec in backbone.specs.items():
            m.check_grid(spec.height, spec.width, layer)
    store = FeatureStore(backbone, FeatureCache(config.cache_dir), seed=config.seed, batch_size=config.batch_size)
    return images, split, store, manipulations


def run_chapter(config: RunConfig, write: bool = True) -> RunResult:
    """Runs every (manipulation, layer, spatial mode, mapping) of ``config``; writes results/<chapter>.csv."""
    images, split, store, manipulations = prepare(config)
    train = split.views("train", config.train_views)
    val = split.views("val", config.train_views)
    test = split.views("test", config.train_views)
    t0 = time.perf_counter()
    extracted = store.ensure(train + val + test, [None] + manipulations)
    timings = {"extract_seconds": time.perf_counter() - t0, "fit_seconds": 0.0, "stats_seconds": 0.0}
    rows = []
    for manip in manipulations:
        for layer in store.backbone.layers:
            x_test = store.load(test, None, layer)
            y_test = store.load(test, manip, layer)
            for spatial in spatial_modes(manip, config):
                t1 = time.perf_counter()
                train_stats = _stats(store, train, manip, layer, spatial, config.batch_size)
                val_stats = _stats(store, val, manip, layer, spatial, config.batch_size)
                timings["stats_seconds"] += time.perf_counter() - t1
                x_in = manip.grid_op(x_test) if spatial == "applied" else x_test
                base = {"family": manip.family, "manipulation": manip.name, "backbone": config.backbone,
                        "layer": layer, "spatial": spatial}
                for name in config.mappings:
                    mapping = get_mapping(name, config.ridge)
                    t2 = time.perf_counter()
                    mapping.fit(train_stats, val_stats)
                    fit_s = time.perf_counter() - t2
                    timings["fit_seconds"] += fit_s
                    pred = mapping.predict(x_in)
                    b = {**base, "mapping": name}
                    for metric in FEATURE_METRICS:
                        values = METRICS.get(metric).fn(pred, y_test).numpy()
                        rows.append(sample_rows(b, metric, values, config.bootstrap, config.seed))
                    rows.append(row(b, "n_train_positions", train_stats.n + val_stats.n,
                                    len(train) + len(val)))
                    rows.append(row(b, "fit_seconds", fit_s, len(train) + len(val)))
                    rows.append(row(b, "n_params", mapping.n_params(), len(train) + len(val)))
                    for metric, value in mapping.extra_metrics().items():
                        rows.append(row(b, metric, value, len(train) + len(val)))
    table = pd.DataFrame(rows, columns=COLUMNS)
    if write:
        write_results(table, config.chapter)
    return RunResult(config, table, split, images, store, manipulations, timings, extracted)


def example_images(result: RunResult, n_photos: int = 2) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Returns, for the first ``n_photos`` test photos, [(photo id, [(name, image), ...])] with the original first."""
    out = []
    for view in result.split.views("test", 1)[:n_photos]:
        panels = [("original", result.store.image(view, None))]
        panels += [(m.name, result.store.image(view, m)) for m in result.manipulations]
        out.append((view.photo.id, panels))
    return out
