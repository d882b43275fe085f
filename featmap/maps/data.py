"""The training pairs of one fit, read from the feature store on demand: statistics stream over batches."""
from __future__ import annotations

import torch

from featmap.core.distributed import Context
from featmap.core.io import content_key
from featmap.data.images import View
from featmap.edits.manipulations import Manipulation
from featmap.features.store import FeatureStore
from featmap.maps.stats import LinearStats, PositionStats


class PairData:
    """The (original, manipulated) training and validation pairs of one fit, read from the cache on demand.

    Statistics stream over batches (memory independent of the number of images); ``tensors`` loads a part
    whole, for the trained maps.
    """

    def __init__(self, store: FeatureStore, views: dict[str, list[View]], manipulation: Manipulation, layer: str,
                 spatial: str, batch: int):
        self.store, self.views, self.manipulation, self.layer = store, views, manipulation, layer
        self.spatial, self.batch = spatial, batch
        self.spec = store.backbone.specs[layer]
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stats: dict[tuple[str, str], LinearStats] = {}
        self.key = content_key({part: [[store.key(v, None, layer), store.key(v, manipulation, layer)] for v in vs]
                                for part, vs in views.items()} | {"spatial": spatial})

    def _load(self, views: list[View]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.store.load(views, None, self.layer)
        if self.spatial == "applied":
            x = self.manipulation.grid_op(x)
        return x, self.store.load(views, self.manipulation, self.layer)

    def _batches(self, part: str):
        if part in self._loaded:
            x, y = self._loaded[part]
            yield from ((x[i:i + self.batch], y[i:i + self.batch]) for i in range(0, len(x), self.batch))
            return
        views = self.views[part]
        for i in range(0, len(views), self.batch):
            yield self._load(views[i:i + self.batch])

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        if part not in self._loaded:
            self._loaded[part] = self._load(self.views[part])
        return self._loaded[part]

    def stats(self, part: str) -> LinearStats:
        if ("shared", part) not in self._stats:
            stats = LinearStats(self.spec.channels, self.spec.channels)
            for x, y in self._batches(part):
                stats.update(x, y)
            self._stats[("shared", part)] = stats
        return self._stats[("shared", part)]

    def position_stats(self, part: str) -> PositionStats:
        if ("position", part) not in self._stats:
            stats = PositionStats(self.spec.channels, self.spec.channels, self.spec.height * self.spec.width)
            for x, y in self._batches(part):
                stats.update(x, y)
            self._stats[("position", part)] = stats
        return self._stats[("position", part)]


class ShardedPairData(PairData):
    """``PairData`` whose statistics stream over this rank's share of the views and are summed over ranks.

    Each rank reads only its share of the cached features for the closed-form fits; every rank ends with the
    statistics of all views, the numbers one process would have. ``key`` and ``tensors`` (the whole parts, for
    the trained maps) are ``PairData``'s, so a trained map's cache key does not depend on the number of ranks.
    """

    def __init__(self, context: Context, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = context

    def _summed(self, kind: str, part: str, stats: LinearStats) -> LinearStats:
        if (kind, part) not in self._stats:
            views = self.context.shard(self.views[part])
            for i in range(0, len(views), self.batch):
                stats.update(*self._load(views[i:i + self.batch]))
            self._stats[(kind, part)] = self.context.all_reduce_stats(stats)
        return self._stats[(kind, part)]

    def stats(self, part: str) -> LinearStats:
        return self._summed("shared", part, LinearStats(self.spec.channels, self.spec.channels))

    def position_stats(self, part: str) -> PositionStats:
        spec = self.spec
        return self._summed("position", part, PositionStats(spec.channels, spec.channels, spec.height * spec.width))
