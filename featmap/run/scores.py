"""Scores of a plan's cells, cached by content: a rerun with the same inputs refits and rescores nothing.

An entry holds the rows a (cell, map) wrote to the results table, the per-sample scores the paired gap rows need,
and the small reconstructions the figures show, in one ``.npz`` (no pickles). Its key is built from everything the
numbers depend on: the training and test features' own content keys, the map and its options, the classifier
tail's and the inverter's identities, the bootstrap settings and the scoring code's version; where an inverter scores
images, also which image metrics ran with which weights (``featmap.score.images.image_metric_identity``): scores
computed where LPIPS was unavailable are never served to a run where it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featmap.core.io import cached, content_key, default_cache_dir

# Raise when what a cached score means changes (a metric's definition, a new row): old entries are then misses.
SCORES_VERSION = 4


class ScoreCache:
    """Rows, per-sample arrays and images under a content key in ``<cache>/scores/``; counts hits and computes."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or default_cache_dir()) / "scores"
        self.hits = self.computed = 0
        self._image_metrics: dict | None = None  # looked up once a run: a lookup reads package metadata

    def key(self, identity: dict) -> str:
        """Returns the content key of ``identity``'s scores (with the image metrics' identity where it names an
        inverter)."""
        judged = {}
        if identity.get("inverter"):
            if self._image_metrics is None:
                from featmap.score.images import image_metric_identity

                self._image_metrics = image_metric_identity()
            judged = {"image_metrics": self._image_metrics}
        return content_key({"scores": SCORES_VERSION, **identity, **judged})

    def get_or_compute(self, identity: dict | None, compute) -> dict:
        """Returns ``{"rows": [...], "arrays": {name: ndarray}}`` for ``identity``: cached, or ``compute()``'s.

        ``identity`` None (an input without a content identity, such as a user's own inverter) always computes.
        """
        if identity is None:
            self.computed += 1
            return compute()
        path = self.root / f"{self.key(identity)}.npz"

        def load(p):
            with np.load(p, allow_pickle=False) as z:
                out = {"rows": json.loads(str(z["__rows__"])),
                       "arrays": {k: z[k] for k in z.files if k != "__rows__"}}
            self.hits += 1
            return out

        def fresh():
            self.computed += 1
            return compute()

        def save(f, value):
            np.savez(f, __rows__=np.array(json.dumps(value["rows"])), **value["arrays"])

        return cached(path, load, fresh, save)


def results_provenance(config, images, backbone, label: str | None = None) -> dict[str, dict]:
    """Returns ``featmap.core.table.provenance`` of one run for ``write_results``, with the image metrics and their
    weights (``image_metric_identity``) where the run scores images: a table made without LPIPS says so."""
    from featmap.core.table import provenance

    judged = None
    if config.image_layers:
        from featmap.score.images import image_metric_identity

        judged = image_metric_identity()
    return provenance(config, images, backbone, label, judged)
