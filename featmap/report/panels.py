"""The photos a chapter's figures show, chosen from a run: every edit of a few test photos, and the photo where a map
does best and the one where it does worst."""
from __future__ import annotations

import numpy as np

from featmap.core.table import comparable_spatial
from featmap.edits.editors import SplitEdit
from featmap.run.chapter import RunResult


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


def best_and_worst(result: RunResult, mapping: str = "linear", metric: str = "cos_mean",
                   layer: str | None = None) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Returns, per edit, the test photo where ``mapping`` scores best and the one where it scores worst on
    ``metric`` at ``layer`` (default: the deepest) in the edit's comparable spatial mode, as plot_examples panels:
    [(label, [(title, image), ...])] with the original and the edited photo and the score in the titles."""
    layer = layer or result.store.backbone.layers[-1]
    out = []
    for manip in result.manipulations:
        spatial = comparable_spatial(manip.grid_op is not None)
        scores = result.per_photo.get((manip.name, layer, spatial, mapping), {}).get(metric)
        views = result.tested.get(manip.name, [])
        if scores is None or not len(views):
            continue
        finite = np.where(np.isfinite(scores))[0]
        if not len(finite):
            continue
        for word, i in (("best", finite[np.argmax(scores[finite])]), ("worst", finite[np.argmin(scores[finite])])):
            view = views[int(i)]
            out.append((f"{manip.name}: {word}", [
                ("original", result.store.image(view, None)),
                (f"{manip.name}\n{mapping} {metric} {scores[i]:.2f}", result.store.image(view, manip))]))
    return out
