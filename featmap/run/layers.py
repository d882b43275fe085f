"""Layer by layer: what the shared linear maps look like at every stage, for trained and untrained weights."""
from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from featmap.core.progress import bar as progress_bar
from featmap.core.table import COLUMNS, row, sample_rows, write_results
from featmap.features.backbone import create_model
from featmap.maps.base import MapOptions
from featmap.maps.closed_form import Linear
from featmap.maps.data import PairData
from featmap.maps.stats import positions
from featmap.run.config import RunConfig
from featmap.run.plan import Plan
from featmap.run.prepare import extract, prepare, views_by_part, views_of
from featmap.run.scores import ScoreCache, results_provenance
from featmap.score.change import erank_noise_floor, grid_alignment
from featmap.score.geometry import linear_geometry, truncate
from featmap.score.metrics import cos_mean

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
FIXED_ALPHAS = (0.0, 1.0)  # the geometry at these relative ridge strengths too (rows linear_alpha0, linear_alpha1)
FLOOR_SHUFFLES = 3  # shuffles of the noise floor of delta_erank


def stage_names(backbone: str) -> list[str]:
    """Returns the module names of every stage of a timm model (its ``feature_info``), shallow to deep."""
    model = create_model(backbone, "random")
    names = [f["module"] for f in getattr(model, "feature_info", [])]
    if not names:
        raise ValueError(f"{backbone} lists no stages (feature_info); give layers as a list of module names")
    return names


def backbone_label(config: RunConfig, weights: str) -> str:
    """Returns the backbone column: the timm name, with ``:<weights>`` for the control."""
    return config.backbone if weights == config.weights else f"{config.backbone}:{weights}"


def _layer_rows(cfg: RunConfig, store, cell, views: dict, label: str, ranks) -> dict:
    """Returns one cell's rows: test cosines of identity and the shared linear map, the linear map's fit facts
    and geometry, and the test cosines of its rank-k truncations."""
    manip, layer, spatial = cell.manipulation, cell.layer, cell.spatial
    train, val, test = views["train"], views["val"], views["test"]
    data = PairData(store, {"train": train, "val": val}, manip, layer, spatial, cfg.batch_size)
    x_test, y_test = store.load(test, None, layer), store.load(test, manip, layer)
    x_in = manip.grid_op(x_test) if spatial == "applied" else x_test
    base = {"family": manip.family, "manipulation": manip.name, "backbone": label, "layer": layer, "spatial": spatial}
    n_fit = len(train)  # maps are fit on the training photos only
    rows = []
    for cls in cell.mappings:
        mapping = cls(MapOptions(ridge=cfg.ridge)).fit(data)
        rows.append(sample_rows({**base, "mapping": cls.name}, "cos_mean",
                                cos_mean(mapping.predict(x_in), y_test).numpy(), cfg.bootstrap, cfg.seed))
    lin = {**base, "mapping": "linear"}
    rows.append(row(lin, "n_train_positions", len(train) * x_test.shape[2] * x_test.shape[3], len(train)))
    rows += [row(lin, metric, value, n_fit) for metric, value in mapping.extra_metrics().items()]
    for metric, value in linear_geometry(mapping.weight, mapping.bias, positions(x_in)).items():
        rows.append(row(lin, metric, value, len(test)))
    # "Low rank" means lower than noise: the same fit, at the same strength, on pairs whose change belongs to
    # another photo (score.change.erank_noise_floor); min and max over the shuffles as the interval.
    x_train, y_train = data.tensors("train")
    floor = erank_noise_floor(x_train, y_train, mapping.lam, n_shuffles=FLOOR_SHUFFLES, seed=cfg.seed)
    for name in ("delta_erank_floor", "delta_erank_floor_frac"):
        rows.append(row(lin, name, floor[name], len(train), (floor[name + "_min"], floor[name + "_max"])))
    # The geometry at fixed strengths beside ``auto``: 0 (least squares, the data alone) and one common alpha for
    # every layer, so a trend with depth cannot be the prior's fingerprint (auto's alpha grows with depth).
    for alpha in FIXED_ALPHAS:
        fixed = Linear(MapOptions(ridge=alpha)).fit(data)
        b = {**base, "mapping": f"linear_alpha{alpha:g}"}
        rows.append(sample_rows(b, "cos_mean", cos_mean(fixed.predict(x_in), y_test).numpy(), cfg.bootstrap,
                                cfg.seed))
        rows += [row(b, metric, value, len(test))
                 for metric, value in linear_geometry(fixed.weight, fixed.bias, positions(x_in)).items()]
    if manip.grid_op is not None:  # how well the grid rotation/flip of f(x) lines up with f(edit(x)) here
        aligned = grid_alignment(manip.grid_op(x_test), y_test)
        rows += [row({**base, "mapping": "grid_op"}, metric, value, len(test))
                 for metric, value in aligned.metrics().items()]
    eye = torch.eye(len(mapping.weight))
    for k in ranks:
        if k >= len(mapping.weight):
            break
        w_k = truncate(mapping.weight, k, around=eye)
        pred = torch.einsum("oc,bchw->bohw", w_k, x_in) + mapping.bias.view(1, -1, 1, 1)
        rows.append(sample_rows({**base, "mapping": f"linear_rank{k}"}, "cos_mean",
                                cos_mean(pred, y_test).numpy(), cfg.bootstrap, cfg.seed))
    return {"rows": rows, "arrays": {}}


def layers_config(config: RunConfig) -> RunConfig:
    """Returns the configuration the layers run executes: identity and the shared linear map, every edit in its
    comparable spatial mode (geometric edits after the grid rotation/flip)."""
    return dataclasses.replace(config, mappings=["identity", "linear"], spatial=["applied"], image_layers=[])


def run_layers(config: RunConfig, control: str | None = "random", ranks=DEFAULT_RANKS,
               write: bool = True) -> pd.DataFrame:
    """Fits identity and the shared linear map at every layer, for ``config.weights`` and the ``control``
    weights; returns (and writes to results/<chapter>.csv) test cosines, weight-vs-bias shares, spectra of W
    and W - I, and test cosines of W truncated to its top-k directions of W - I. Each cell's rows are cached by
    content, so a rerun fits nothing."""
    rows, produced = [], {}
    config = layers_config(config)
    cache = ScoreCache(config.cache_dir)
    for weights in [config.weights] + ([control] if control else []):
        cfg = dataclasses.replace(config, weights=weights)
        images, split, store, manipulations = prepare(cfg)
        parts = views_by_part(cfg, split)
        extract(store, parts, manipulations)
        label = backbone_label(config, weights)
        produced.update(results_provenance(cfg, images, store.backbone, label))
        cells = Plan.build(cfg, manipulations, store.backbone.layers, semantics=False).cells
        bar = progress_bar(total=len(cells), desc=f"layers ({label}): fitting linear maps", unit="cell")
        for cell in cells:
            views = views_of(cell.manipulation, parts)
            keys = {part: [[store.key(v, None, cell.layer), store.key(v, cell.manipulation, cell.layer)]
                           for v in vs] for part, vs in views.items()}
            identity = {"layers": keys, "spatial": cell.spatial, "maps": [c.name for c in cell.mappings],
                        "ridge": cfg.ridge, "label": label, "ranks": list(ranks), "bootstrap": cfg.bootstrap,
                        "seed": cfg.seed}
            rows += cache.get_or_compute(identity, lambda: _layer_rows(cfg, store, cell, views, label, ranks))["rows"]
            bar.update(1)
        bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    if write:
        write_results(table, config.chapter, produced)
    return table
