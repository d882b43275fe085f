"""What a cell of the plan yields: its fitted maps' rows and per-photo scores, and the scorers the cells of one
(manipulation, layer) share."""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from featmap.core.seeding import derive_seed
from featmap.core.table import row, sample_rows
from featmap.data.images import Split, View, to_uint8_images
from featmap.edits.editors import SplitEdit
from featmap.edits.manipulations import get_manipulation
from featmap.features.backbone import classifier_tail
from featmap.features.store import FeatureStore
from featmap.maps.base import GLOBAL_MAPS, Mapping
from featmap.maps.data import PairData
from featmap.maps.learned import objective
from featmap.maps.stats import positions
from featmap.run.config import RunConfig
from featmap.run.plan import Cell
from featmap.score.change import box_mask, changed_positions, cos_changed
from featmap.score.geometry import linear_geometry
from featmap.score.imagespace import ImageScorer
from featmap.score.inversion import Inverter, InverterConfig, train_inverter
from featmap.score.metrics import FEATURE_METRICS, METRICS
from featmap.score.semantic import SemanticScorer
from featmap.train.loop import TrainConfig

# The metrics a gap row compares photo by photo: feature space, the classifier's decision, and image space.
GAP_METRICS = ("cos_mean", "cos_changed_mean", "top1_agree", "jsd", "ssim", "lpips", "st_lpips",
               "cos_reextract_median")


def finite_rows(base: dict, metric: str, per_sample: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """Returns the row of a per-sample metric over its finite samples (a changed-region score is NaN for a photo
    the edit left unchanged at this layer), or no row when none is finite; ``n`` counts the samples used."""
    values = np.asarray(per_sample, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [sample_rows(base, metric, values, n_boot, seed)] if len(values) else []


def gap_rows(base: dict, per_sample: dict[str, dict[str, np.ndarray]], n_boot: int, seed: int) -> list[dict]:
    """Returns paired gap rows: ``<metric>_gap_identity`` for every fitted map (the map minus identity, photo by
    photo: claim 1's test) and ``<metric>_gap_<global map>`` for the linear map (linear minus a global map: claim
    2's), each averaged over the photos both scored, with a paired bootstrap interval."""
    out = []
    pairs = [(name, "identity") for name in per_sample if name != "identity"]
    pairs += [("linear", other) for other in GLOBAL_MAPS if "linear" in per_sample]
    for name, other in pairs:
        for metric, values in per_sample.get(other, {}).items():
            if metric in per_sample[name] and metric in GAP_METRICS:
                out += finite_rows({**base, "mapping": name}, f"{metric}_gap_{other}",
                                   per_sample[name][metric] - values, n_boot, seed)
    return out


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
    options = InverterConfig(image_size=config.inverter_size, epochs=config.inverter_epochs,
                             precision=config.inverter_precision, seed=config.seed, device=config.device)
    return {layer: given.get(layer) or train_inverter(store, split.views("train", 1), edits, layer, options,
                                                      config.cache_dir, val_views=split.views("val", 1))
            for layer in layers}


def image_subset(test: list[View], n: int | None, seed: int) -> list[View]:
    """Returns a seeded random subset of ``n`` test views (all for None), in test order: the photos scored in image
    space. Drawn from the photo keys, so every edit that can use a photo draws it alike."""
    if n is None or n >= len(test):
        return list(test)
    order = sorted(test, key=lambda v: derive_seed(seed, "image_photos", v.key))
    chosen = {v.key for v in order[:n]}
    return [v for v in test if v.key in chosen]


def changed_of(store: FeatureStore, manip, views: list[View], x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Returns ((N, H*W) bool, local): the positions the edit changed in each view (see ``score.change``) and
    whether they are the edit's own region. ``x``: the original maps as extracted (no grid operation), ``y``: the
    edited ones. The painted square or the object mask mapped onto the grid where the edit has one (a local edit),
    else the positions whose true change (against the grid-permuted original for geometric edits) exceeds the
    default threshold."""
    if getattr(manip, "box", None) is not None:
        return changed_positions(x, y, mask=box_mask(manip.box, store.backbone.preprocessing.size)), True
    if isinstance(manip, SplitEdit):
        masks = [manip.mask(v, store.image(v, None)) for v in views]
        if masks and all(m is not None for m in masks):
            return changed_positions(x, y, mask=torch.from_numpy(np.stack(masks))), True
    return changed_positions(manip.grid_op(x) if manip.grid_op is not None else x, y), False


class CellScorer:
    """What the cells of one (manipulation, layer) share, built on first need: the test features, the classifier
    tail's scorer and the image-space scorer. A rerun whose scores are all cached builds none of them."""

    def __init__(self, config: RunConfig, store: FeatureStore, manip, layer: str, test: list[View],
                 inverter: Inverter | None, tails: dict, val: list[View] = ()):
        self.config, self.store, self.manip, self.layer, self.test = config, store, manip, layer, test
        self.val = list(val)
        self.inverter, self._tails = inverter, tails
        self.image_views = image_subset(test, config.image_photos, config.seed)
        chosen = {v.key for v in self.image_views}
        # where the image-scored photos sit among the test photos: their maps are y_test[image_index]
        self.image_index = torch.tensor([i for i, v in enumerate(test) if v.key in chosen], dtype=torch.long)
        self._built: dict = {}

    def identity(self) -> dict:
        """Returns what every score of this group depends on besides the map: test features, judges, settings."""
        store, layer = self.store, self.layer
        return {"backbone": store.backbone.identity(), "layer": layer,
                "test": [[store.key(v, None, layer), store.key(v, self.manip, layer)] for v in self.test],
                "inverter": getattr(self.inverter, "key", None) if self.inverter else None,
                "image_views": [store.key(v, self.manip, layer) for v in self.image_views] if self.inverter else [],
                "bootstrap": self.config.bootstrap, "seed": self.config.seed, "batch": self.config.batch_size}

    def cacheable(self) -> bool:
        """Returns whether every input has a content identity (a user's own inverter may have none)."""
        return self.inverter is None or bool(getattr(self.inverter, "key", ""))

    def _get(self, name, make):
        if name not in self._built:
            self._built[name] = make()
        return self._built[name]

    @property
    def x_test(self) -> torch.Tensor:
        return self._get("x", lambda: self.store.load(self.test, None, self.layer))

    @property
    def y_test(self) -> torch.Tensor:
        return self._get("y", lambda: self.store.load(self.test, self.manip, self.layer))

    @property
    def changed(self) -> torch.Tensor:
        """Returns (N, H*W) bool: the positions the edit changed in each test photo (``changed_of``)."""
        return self._get("changed", lambda: changed_of(self.store, self.manip, self.test, self.x_test,
                                                       self.y_test)[0])

    @property
    def local(self) -> bool:
        """Returns whether the edit names its own region (a painted square or an object mask): a local edit."""
        return self._get("local", lambda: changed_of(self.store, self.manip, self.test[:1], self.x_test[:1],
                                                     self.y_test[:1])[1])

    @property
    def val_changed(self) -> torch.Tensor:
        """Returns (N_val, H*W) bool: the positions the edit changed in each validation view, in ``val`` order."""
        def make():
            store, manip, layer = self.store, self.manip, self.layer
            return changed_of(store, manip, self.val, store.load(self.val, None, layer),
                              store.load(self.val, manip, layer))[0]
        return self._get("val_changed", make)

    @property
    def semantic(self) -> SemanticScorer:
        def make():
            tail = self._tails.setdefault(self.layer, classifier_tail(self.store.backbone, self.layer))
            return SemanticScorer(tail, self.y_test, self.test, self.config.batch_size)
        return self._get("semantic", make)

    @property
    def imager(self) -> ImageScorer:
        return self._get("imager", lambda: ImageScorer(
            self.inverter, self.store.backbone, self.layer,
            np.stack([self.store.image(v, self.manip) for v in self.image_views]),
            self.y_test[self.image_index], batch_size=self.config.batch_size))


def row_base(config: RunConfig, manip, layer: str, spatial: str, mapping: str) -> dict:
    """Returns the columns that say which cell and map a row belongs to."""
    return {"family": manip.family, "manipulation": manip.name, "backbone": config.backbone, "layer": layer,
            "spatial": spatial, "mapping": mapping}


def target_scores(config: RunConfig, group: CellScorer, semantics: bool, n_examples: int) -> dict:
    """Returns the ``target`` rows of a group (the true manipulated map's accuracy and reconstruction quality)
    and the images its figures show."""
    base = row_base(config, group.manip, group.layer, "none", "target")
    rows, arrays = [], {}
    # the edit's kind, for the claims: a local edit (its own region) is judged on the positions it changed
    rows.append(row(base, "local_edit", float(group.local), len(group.test)))
    rows.append(sample_rows(base, "changed_share", group.changed.double().mean(1).numpy(), config.bootstrap,
                            config.seed))
    if semantics:
        rows += group.semantic.accuracy_rows(base, None, config.bootstrap, config.seed)
    if group.inverter is not None:
        imager = group.imager
        rows += [sample_rows(base, metric, values, config.bootstrap, config.seed)
                 for metric, values in imager.target_scores().items()]
        unrelated = {**base, "mapping": "unrelated"}  # the baseline the inverter's own images must beat
        rows += [sample_rows(unrelated, metric, values, config.bootstrap, config.seed)
                 for metric, values in imager.unrelated_scores().items()]
        arrays = {"image/original": to_uint8_images(
            np.stack([group.store.image(v, None) for v in group.image_views[:n_examples]]), imager.size),
            "image/manipulated": imager.reference[:n_examples], "image/target": imager.target[:n_examples]}
    return {"rows": rows, "arrays": arrays}


def _beside_trained(cell: Cell) -> bool:
    """Returns whether trained maps run in ``cell`` (the closed-form linear map's objective is then recorded)."""
    return any(m.learned for m in cell.mappings)


def map_scores(config: RunConfig, group: CellScorer, cell: Cell, mapping: Mapping, data: PairData,
                n_fit: int, n_examples: int, timings: dict, train_cfg: TrainConfig) -> dict:
    """Fits ``mapping`` on ``data`` and returns its rows, per-sample scores (``score/<metric>``) and, where the
    cell scores it in image space, its reconstructions (``image``)."""
    t0 = time.perf_counter()
    mapping.fit(data)
    timings["fit_seconds"] += time.perf_counter() - t0
    fit_s = mapping.fit_seconds() or (time.perf_counter() - t0)
    x_in = group.manip.grid_op(group.x_test) if cell.spatial == "applied" else group.x_test
    bs = config.batch_size
    pred = torch.cat([mapping.predict(x_in[i:i + bs]) for i in range(0, len(x_in), bs)])
    b = row_base(config, group.manip, cell.layer, cell.spatial, mapping.name)
    y_test = group.y_test
    scores = {metric: METRICS.get(metric).fn(pred, y_test).numpy() for metric in FEATURE_METRICS}
    scores["cos_changed_mean"], scores["cos_changed_median"] = (v.numpy() for v in cos_changed(pred, y_test,
                                                                                                 group.changed))
    rows, arrays = [], {}
    if cell.semantics:
        scores.update(group.semantic.agreement(pred))
        rows += group.semantic.accuracy_rows(b, pred, config.bootstrap, config.seed)
    if mapping.name in cell.images:
        t1 = time.perf_counter()
        imager = group.imager
        pred_imaged = pred[group.image_index]  # the image-scored photos' predictions, in the imager's order
        scores.update(imager.scores(pred_imaged))
        arrays["image"] = imager.reconstruct(pred_imaged[:n_examples])
        timings["image_seconds"] += time.perf_counter() - t1
    rows += [r for metric, values in scores.items()
             for r in finite_rows(b, metric, values, config.bootstrap, config.seed)]
    x_val, y_val = data.tensors("val")  # the validation photos: never fit, they choose (the best map among them)
    val_pred = torch.cat([mapping.predict(x_val[i:i + bs]) for i in range(0, len(x_val), bs)])
    rows.append(sample_rows(b, "val_cos_mean", METRICS.get("cos_mean").fn(val_pred, y_val).numpy(), config.bootstrap,
                            config.seed))
    if group.local:  # a best map of a local edit is chosen on the changed positions of the validation photos
        rows += finite_rows(b, "val_cos_changed_mean", cos_changed(val_pred, y_val, group.val_changed)[0].numpy(),
                            config.bootstrap, config.seed)
    rows.append(row(b, "n_train_positions", n_fit * y_test.shape[2] * y_test.shape[3], n_fit))
    rows.append(row(b, "fit_seconds", fit_s, n_fit))
    rows.append(row(b, "n_params", mapping.n_params(), n_fit))
    rows += [row(b, metric, value, n_fit) for metric, value in mapping.extra_metrics().items()]
    if mapping.name == "linear":
        rows += [row(b, metric, value, len(group.test))
                 for metric, value in linear_geometry(mapping.weight, mapping.bias, positions(x_in)).items()]
        if _beside_trained(cell):  # the trained maps' objective, to read their convergence against
            rows += [row(b, metric, value, n_fit) for metric, value in objective(mapping, data, train_cfg).items()]
    return {"rows": rows, "arrays": {**arrays, **{f"score/{k}": np.asarray(v) for k, v in scores.items()}}}


def photo_scores(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns {metric: (n,)}: the per-photo scores among a map's cached arrays (``map_scores``' ``score/``)."""
    return {k.removeprefix("score/"): v for k, v in arrays.items() if k.startswith("score/")}


def map_identity(mapping: Mapping, data: PairData, cell: Cell) -> dict:
    """Returns what a map's fit and rows depend on: its name and options, and the training pairs' content (and,
    for the closed-form linear map beside trained maps, the objective its training and validation loss use)."""
    if mapping.learned:
        return {"map": mapping.identity(data)}
    objective = ({"objective": asdict(mapping.options.train)} if mapping.name == "linear" and _beside_trained(cell)
                 else {})
    return {"map": mapping.name, "ridge": mapping.options.ridge, "data": data.key, **objective}
