"""One chapter run: photos -> manipulated views -> cached features -> fitted maps -> results table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch

from featmap.core.table import COLUMNS, row, sample_rows, write_results
from featmap.data.images import ImageSet, Split, View, to_uint8_images
from featmap.edits.editors import SplitEdit, get_editor
from featmap.edits.manifest import ManifestEdit, manifest_images, read_manifest
from featmap.edits.manipulations import Manipulation, get_manipulation
from featmap.edits.semantic import SemanticEdit
from featmap.features.backbone import Backbone, classifier_tail
from featmap.features.store import FeatureCache, FeatureStore
from featmap.maps.base import MAPPINGS, MapOptions, Mapping
from featmap.maps.data import PairData
from featmap.maps.stats import positions
from featmap.run.config import RunConfig
from featmap.score.geometry import linear_geometry
from featmap.score.imagespace import ImageScorer
from featmap.score.inversion import Inverter, InverterConfig, train_inverter
from featmap.score.metrics import FEATURE_METRICS, METRICS
from featmap.score.semantic import SemanticScorer
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


def map_options(config: RunConfig, progress: bool = True) -> MapOptions:
    """Returns the mapping options of a chapter run (one place: trained maps are cached under keys built from
    them, so a distributed run and a chapter run must agree)."""
    return MapOptions(ridge=config.ridge, size=config.map_size, residual=config.residual, device=config.device,
                      cache_dir=config.cache_dir, progress=progress,
                      train=TrainConfig(lr=config.lr, batch_size=config.train_batch, max_epochs=config.max_epochs,
                                        seed=config.seed))


def maps_to_fit(config: RunConfig, manipulation: Manipulation, layer: str, spatial: str) -> list[type[Mapping]]:
    """Returns the mapping classes of ``config`` that run for (manipulation, layer, spatial mode)."""
    classes = [MAPPINGS.get(name) for name in config.mappings]
    return [cls for cls in classes if applies(cls, manipulation, spatial) and (not cls.learned or config.trains_on(layer))]


def comparable_mode(manipulation: Manipulation, spatial: str) -> bool:
    """Returns whether ``spatial`` is the mode where every map sees the same input: after the exact grid
    permutation for geometric edits, as they are for the rest."""
    return spatial == ("applied" if manipulation.grid_op is not None else "none")


def spatial_modes(manipulation: Manipulation, config: RunConfig) -> list[str]:
    """Returns the spatial modes to run: the configured ones for geometric edits, ``none`` otherwise."""
    return config.spatial if manipulation.grid_op is not None else ["none"]


def applies(mapping: type[Mapping], manipulation: Manipulation, spatial: str) -> bool:
    """Returns whether ``mapping`` runs in this spatial mode.

    Geometric edits: ``applied`` runs every map after the exact grid permutation; on the raw grid, maps
    that act on each position alone run as ``none`` (they cannot move content, the floor for geometry) and
    maps that mix positions run as ``learned`` (they may learn the permutation). Other edits: ``none``.
    """
    if manipulation.grid_op is None or spatial == "applied":
        return True
    return mapping.per_position == (spatial == "none")


# The global maps the shared linear map is compared with, sample by sample (the study's second claim).
GLOBAL_MAPS = ("transformer", "transformer_pe")
# The metrics compared that way: feature space, the classifier's decision, and image space.
GAP_METRICS = ("cos_mean", "top1_agree", "ssim", "st_lpips", "cos_reextract_median")


def gap_rows(base: dict, per_sample: dict[str, dict[str, np.ndarray]], n_boot: int, seed: int) -> list[dict]:
    """Returns rows ``<metric>_gap_<global map>`` for the linear map: the per-sample difference linear - global,
    averaged, with a paired bootstrap interval (both maps scored on the same test photos)."""
    if "linear" not in per_sample:
        return []
    out = []
    for other in GLOBAL_MAPS:
        for metric, values in per_sample.get(other, {}).items():
            if metric in per_sample["linear"] and metric in GAP_METRICS:
                out.append(sample_rows({**base, "mapping": "linear"}, f"{metric}_gap_{other}",
                                       per_sample["linear"][metric] - values, n_boot, seed))
    return out


def _edit_factory(name: str, config: RunConfig, pairs) -> Callable[[], SemanticEdit]:
    if pairs is not None and any(p.edit == name for p in pairs):
        return lambda: ManifestEdit(name, pairs, cache_root=config.cache_dir)
    params = {"cache_root": config.cache_dir, **config.editor_params.get(name, {})}
    get_editor(name, **params)  # checks the parameters before any work
    return lambda: get_editor(name, **params)


def prepare(config: RunConfig) -> tuple[ImageSet, Split, FeatureStore, list[Manipulation | SplitEdit]]:
    """Returns the photos, split, feature store and manipulations of a run, checking every name first.

    Semantic edits come back bound to the split (``SplitEdit``): their object masks are computed here, and
    ``usable`` lists the views each part can edit honestly.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    pairs = read_manifest(config.edit_manifest) if config.edit_manifest else None
    manifest_names = {p.edit for p in pairs or []}
    semantic = [n for n in config.manipulations if config.is_editor(n) or n in manifest_names]
    manipulations = {n: get_manipulation(n) for n in config.manipulations if n not in semantic}
    factories = {n: _edit_factory(n, config, pairs) for n in semantic}
    if pairs is not None:
        images = manifest_images(pairs).subset(config.max_images, config.seed)
    else:
        images = ImageSet.from_spec(config.images, config.skip_bad_images, config.max_images, config.seed)
    split = images.split(config.test_fraction, config.val_fraction, config.seed)
    backbone = Backbone(config.backbone, config.layers, config.weights, config.image_size, config.device,
                        config.seed)
    for m in manipulations.values():
        for layer, spec in backbone.specs.items():
            m.check_grid(spec.height, spec.width, layer)
    store = FeatureStore(backbone, FeatureCache(config.cache_dir), seed=config.seed, batch_size=config.batch_size)
    parts = {part: split.views(part, config.train_views) for part in ("train", "val", "test")}
    for name, make in factories.items():
        edit = SplitEdit(make, parts, lambda v: store.image(v, None), config.seed)
        empty = [part for part, views in edit.usable.items() if not views]
        if empty:
            reasons = sorted(set(edit.skipped.values()))[:3]
            raise ValueError(f"{name} can edit no photo of the {', '.join(empty)} part(s) of {len(images)} photos; "
                             f"reasons: {reasons}")
        manipulations[name] = edit
    return images, split, store, [manipulations[n] for n in config.manipulations]


def views_of(manipulation: Manipulation | SplitEdit, parts: dict[str, list[View]]) -> dict[str, list[View]]:
    """Returns the train / val / test views ``manipulation`` runs on (all of them, or a semantic edit's usable
    ones)."""
    return manipulation.usable if isinstance(manipulation, SplitEdit) else parts


def extract(store: FeatureStore, parts: dict[str, list[View]], manipulations: list[Manipulation | SplitEdit]) -> int:
    """Extracts whatever is missing: every view original and manipulated, a semantic edit's usable views;
    returns how many images went through the backbone."""
    plain = [m for m in manipulations if not isinstance(m, SplitEdit)]
    done = store.ensure(parts["train"] + parts["val"] + parts["test"], [None] + plain)
    for edit in manipulations:
        if isinstance(edit, SplitEdit):
            done += store.ensure([v for part in ("train", "val", "test") for v in edit.usable[part]], [edit])
    return done


def inverters_for(config: RunConfig, store: FeatureStore, split: Split,
                  given: dict[str, Inverter] | None = None) -> dict[str, Inverter]:
    """Returns an inverter per image-scored layer: ``given`` ones, else the default decoder, trained on the
    training photos (one view each) under no edit and ``config.inverter_manipulations`` (cached by content)."""
    given = dict(given or {})
    layers = [layer for layer in store.backbone.layers if config.scores_images_on(layer)]
    unknown = [layer for layer in given if layer not in store.backbone.layers]
    if unknown:
        raise ValueError(f"inverters given for {unknown}, which are not among layers {store.backbone.layers}")
    edits = [get_manipulation(n) for n in config.inverter_manipulations]
    options = InverterConfig(image_size=config.inverter_size, epochs=config.inverter_epochs, seed=config.seed,
                             device=config.device)
    return {layer: given.get(layer) or train_inverter(store, split.views("train", 1), edits, layer, options,
                                                      config.cache_dir, val_views=split.views("val", 1))
            for layer in layers}


def run_chapter(config: RunConfig, write: bool = True, inverters: dict[str, Inverter] | None = None,
                n_examples: int = 2) -> RunResult:
    """Runs every (manipulation, layer, spatial mode, mapping) of ``config``; writes results/<chapter>.csv.

    ``inverters``: {layer: Inverter} to use instead of the default decoder (see ``featmap.inversion``);
    ``n_examples``: test photos whose reconstructions are kept for the chapter's figures.
    """
    t0 = time.perf_counter()
    images, split, store, manipulations = prepare(config)
    parts = {part: split.views(part, config.train_views) for part in ("train", "val", "test")}
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
    rows, tails, reconstructions = [], {}, {}
    for manip in manipulations:
        views = views_of(manip, parts)
        train, val, test = views["train"], views["val"], views["test"]
        n_fit = len(train) + len(val)
        for layer in store.backbone.layers:
            x_test = store.load(test, None, layer)
            y_test = store.load(test, manip, layer)
            scorer = None
            if config.scores_semantics_on(layer):
                scorer = SemanticScorer(tails.setdefault(layer, classifier_tail(store.backbone, layer)), y_test,
                                        test, config.batch_size)
                target = {"family": manip.family, "manipulation": manip.name, "backbone": config.backbone,
                          "layer": layer, "spatial": "none", "mapping": "target"}
                rows += scorer.accuracy_rows(target, None, config.bootstrap, config.seed)
            imager = None
            if layer in inverters:
                t1 = time.perf_counter()
                scored = test[:config.image_photos]
                imager = ImageScorer(inverters[layer], store.backbone, layer,
                                     np.stack([store.image(v, manip) for v in scored]), y_test[:len(scored)],
                                     batch_size=config.batch_size)
                target = {"family": manip.family, "manipulation": manip.name, "backbone": config.backbone,
                          "layer": layer, "spatial": "none", "mapping": "target"}
                rows += [sample_rows(target, metric, values, config.bootstrap, config.seed)
                         for metric, values in imager.target_scores().items()]
                reconstructions[manip.name, layer] = {
                    "original": to_uint8_images(np.stack([store.image(v, None) for v in test[:n_examples]]),
                                                imager.size),
                    "manipulated": imager.reference[:n_examples], "target": imager.target[:n_examples]}
                timings["image_seconds"] += time.perf_counter() - t1
            for spatial in spatial_modes(manip, config):
                data = PairData(store, {"train": train, "val": val}, manip, layer, spatial, config.batch_size)
                t1 = time.perf_counter()
                data.stats("train"), data.stats("val")  # one streaming pass, shared by the closed-form maps
                timings["stats_seconds"] += time.perf_counter() - t1
                x_in = manip.grid_op(x_test) if spatial == "applied" else x_test
                base = {"family": manip.family, "manipulation": manip.name, "backbone": config.backbone,
                        "layer": layer, "spatial": spatial}
                per_sample: dict[str, dict[str, np.ndarray]] = {}
                for cls in maps_to_fit(config, manip, layer, spatial):
                    name = cls.name
                    mapping = cls(options)
                    t2 = time.perf_counter()
                    mapping.fit(data)
                    fit_s = mapping.fit_seconds() or (time.perf_counter() - t2)
                    timings["fit_seconds"] += time.perf_counter() - t2
                    pred = torch.cat([mapping.predict(x_in[i:i + config.batch_size])
                                      for i in range(0, len(x_in), config.batch_size)])
                    b = {**base, "mapping": name}
                    scores = {metric: METRICS.get(metric).fn(pred, y_test).numpy() for metric in FEATURE_METRICS}
                    if scorer is not None:
                        scores.update(scorer.agreement(pred))
                        rows += scorer.accuracy_rows(b, pred, config.bootstrap, config.seed)
                    if imager is not None and name in config.image_mappings and comparable_mode(manip, spatial):
                        t1 = time.perf_counter()
                        scores.update(imager.scores(pred[:len(imager.reference)]))
                        label = name if spatial == "none" else f"{name} ({spatial})"
                        reconstructions[manip.name, layer][label] = imager.reconstruct(pred[:n_examples])
                        timings["image_seconds"] += time.perf_counter() - t1
                    per_sample[name] = scores
                    rows += [sample_rows(b, metric, values, config.bootstrap, config.seed)
                             for metric, values in scores.items()]
                    rows.append(row(b, "n_train_positions", n_fit * x_test.shape[2] * x_test.shape[3], n_fit))
                    rows.append(row(b, "fit_seconds", fit_s, n_fit))
                    rows.append(row(b, "n_params", mapping.n_params(), n_fit))
                    for metric, value in mapping.extra_metrics().items():
                        rows.append(row(b, metric, value, n_fit))
                    if name == "linear":
                        for metric, value in linear_geometry(mapping.weight, mapping.bias, positions(x_in)).items():
                            rows.append(row(b, metric, value, len(test)))
                rows += gap_rows(base, per_sample, config.bootstrap, config.seed)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if write:
        write_results(table, config.chapter)
    return RunResult(config, table, split, images, store, manipulations, timings, extracted, reconstructions)


def example_images(result: RunResult, n_photos: int = 2,
                   masks: bool = False) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Returns, for the first ``n_photos`` test photos every manipulation can edit, [(photo id, [(name, image),
    ...])] with the original first; ``masks`` adds the object mask a semantic edit used (outside dimmed)."""
    out = []
    views = result.split.views("test", 1)
    for m in result.manipulations:
        if isinstance(m, SplitEdit):
            usable = {v.key for v in m.usable["test"]}
            views = [v for v in views if v.key in usable]
    for view in views[:n_photos]:
        original = result.store.image(view, None)
        panels = [("original", original)]
        if masks:
            mask = next((mk for m in result.manipulations if isinstance(m, SplitEdit)
                         for mk in [m.mask(view, original)] if mk is not None), None)
            if mask is not None:
                panels.append(("object mask", np.where(mask[..., None], original, original // 4).astype(np.uint8)))
        panels += [(m.name, result.store.image(view, m)) for m in result.manipulations]
        out.append((view.photo.id, panels))
    return out
