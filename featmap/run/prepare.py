"""A run's inputs: the photos, split, feature store and edits of a configuration, and the features they need."""
from __future__ import annotations

from typing import Callable

import torch

from featmap.core.distributed import Context
from featmap.data.images import ImageSet, Split, View
from featmap.edits.editors import SplitEdit, get_editor
from featmap.edits.manifest import ManifestEdit, manifest_images, read_manifest
from featmap.edits.manipulations import Manipulation, get_manipulation
from featmap.edits.semantic import SemanticEdit
from featmap.features.backbone import Backbone
from featmap.features.store import FeatureCache, FeatureStore
from featmap.run.config import RunConfig

PARTS = ("train", "val", "test")


def set_threads(threads: int) -> None:
    """Sets the threads of torch and of OpenCV (GrabCut, inpainting; it starts one per core otherwise, and on a
    busy machine its threads would compete with the other chapter's) to ``threads``."""
    torch.set_num_threads(threads)
    try:
        import cv2
    except ImportError:  # pragma: no cover (OpenCV comes with the requirements)
        return
    cv2.setNumThreads(threads)


def _edit_factory(name: str, config: RunConfig, pairs) -> Callable[[], SemanticEdit]:
    """Returns a maker of the semantic edit ``name``: the manifest's where it names ``name``, else the registered
    editor with the configuration's parameters (checked now, before any work)."""
    if pairs is not None and any(p.edit == name for p in pairs):
        return lambda: ManifestEdit(name, pairs, cache_root=config.cache_dir)
    params = {"cache_root": config.cache_dir, **config.editor_params.get(name, {})}
    get_editor(name, **params)
    return lambda: get_editor(name, **params)


def views_by_part(config: RunConfig, split: Split) -> dict[str, list[View]]:
    """Returns the train / val / test views of ``split`` (``config.train_views`` per training photo)."""
    return {part: split.views(part, config.train_views) for part in PARTS}


def prepare(config: RunConfig) -> tuple[ImageSet, Split, FeatureStore, list[Manipulation | SplitEdit]]:
    """Returns the photos, split, feature store and manipulations of a run, checking every name first.

    Semantic edits come back bound to the split (``SplitEdit``): their object masks are computed here, and
    ``usable`` lists the views each part can edit honestly.
    """
    if config.threads:
        set_threads(config.threads)
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
    parts = views_by_part(config, split)
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


def extract(store: FeatureStore, parts: dict[str, list[View]], manipulations: list[Manipulation | SplitEdit],
            context: Context = Context()) -> int:
    """Extracts whatever is missing of this process's share (``context.shard``; all of it on a single process):
    every view original and manipulated, a semantic edit's usable views; returns how many images this process sent
    through the backbone."""
    plain = [m for m in manipulations if not isinstance(m, SplitEdit)]
    done = store.ensure(context.shard([v for part in PARTS for v in parts[part]]), [None] + plain)
    for edit in manipulations:
        if isinstance(edit, SplitEdit):
            done += store.ensure(context.shard([v for part in PARTS for v in edit.usable[part]]), [edit])
    return done
