"""Semantic edits: offline object-level editors, the registry of editors, and the edit cache.

A ``SemanticEdit`` is used where a ``Manipulation`` is (``name``, ``family``, ``grid_op`` None, ``box``
None, ``__call__(image, seed, item)``, ``cache_key(seed)``, ``check_grid``), after ``bind``:

    views = split.views("train", config.train_views)        # one split part
    edit = get_editor("background_swap").bind(views, lambda v: store.image(v, None))
    views = edit.usable(views)                              # drops photos whose mask failed; edit.skipped says why

``image_of`` must build the working-size view from ``view.photo.path`` (as ``FeatureStore.image`` does),
never look it up by key: edits made elsewhere (``featmap.edits.manifest``) pass it views of their files.
Editors that take another photo (``background_swap``, ``object_paste``) choose it among the bound
views of other photos, from (seed, item, the bound views), so bind each split part separately: a test
photo never borrows from a training photo. Edited images are cached losslessly under
``<cache_root>/edits/``; ``edits_made`` counts the ones computed, ``cache_hits`` the ones read back.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from featmap.core.io import cached, content_key, default_cache_dir
from featmap.core.seeding import rng_for
from featmap.data.images import View
from featmap.edits.segmentation import (
    ObjectMask,
    image_digest,
    object_mask,
    save_png,
    segmenter_identity,
)


class SkippedItem(ValueError):
    """An item an edit refuses to fake (failed object mask, no partner photo); recorded in ``skipped``, its short
    ``kind`` (e.g. "no object found") in ``skipped_kinds`` so reports count reasons without parsing messages."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


COLOURS = {"red": (255, 0, 0), "orange": (255, 128, 0), "yellow": (255, 230, 0), "green": (0, 200, 0),
           "cyan": (0, 220, 255), "blue": (0, 64, 255), "purple": (128, 0, 255), "magenta": (255, 0, 200)}


def parse_colour(colour: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """Returns an (r, g, b) triple from a colour name, ``#rrggbb`` or a triple of 0..255 integers."""
    if isinstance(colour, str):
        if colour in COLOURS:
            return COLOURS[colour]
        text = colour.lstrip("#")
        if len(text) == 6:
            try:
                return tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
            except ValueError:
                pass
        raise ValueError(f"colour must be one of {', '.join(COLOURS)} or '#rrggbb', got {colour!r}")
    rgb = tuple(int(c) for c in colour)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour must be three integers in 0..255, got {colour!r}")
    return rgb


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise TypeError(f"an editor takes a (H, W, 3) uint8 RGB array, got {got}")


def load_png(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Returns the RGB image stored at ``path``; raises when it does not read or is not of ``shape``."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"))
    if arr.shape != tuple(shape):
        raise ValueError(f"{path} holds a {arr.shape} image, expected {tuple(shape)}")
    return arr


# -- the pixel operations (pure) -----------------------------------------------------------------------

def recolour(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], saturation: float) -> np.ndarray:
    """Returns ``image`` with the hue inside ``mask`` set to ``colour``'s, saturation raised to at least
    ``saturation`` (0..1) and HSV value (brightness) kept: shading and texture survive the new colour."""
    import cv2

    hue = colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0] * 360
    hsv = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)  # H in degrees, S and V in 0..1
    hsv[..., 0] = hue
    hsv[..., 1] = np.maximum(hsv[..., 1], saturation)
    rgb = np.clip(np.round(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], rgb, image)


def grow(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Returns ``mask`` dilated by ``fraction`` of the shorter side (at least one pixel when fraction > 0)."""
    import cv2

    r = max(1, round(fraction * min(mask.shape))) if fraction > 0 else 0
    if not r:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def inpaint(image: np.ndarray, region: np.ndarray, radius: int = 5) -> np.ndarray:
    """Returns ``image`` with ``region`` filled by Telea inpainting from its surroundings (only there)."""
    import cv2

    filled = cv2.inpaint(np.ascontiguousarray(image[..., ::-1]), region.astype(np.uint8), radius,
                         cv2.INPAINT_TELEA)[..., ::-1]
    return np.where(region[..., None], filled, image)


def paste(image: np.ndarray, source: np.ndarray, source_mask: np.ndarray, scale: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (``image`` with the masked object of ``source`` scaled by ``scale`` and pasted at a seeded
    position, the (H, W) bool region it covers)."""
    ys, xs = np.nonzero(source_mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = image.shape[:2]
    oh, ow = max(1, min(h, round((y1 - y0) * scale))), max(1, min(w, round((x1 - x0) * scale)))
    obj = np.asarray(Image.fromarray(source[y0:y1, x0:x1]).resize((ow, oh), Image.Resampling.BICUBIC))
    obj_mask = np.asarray(Image.fromarray(source_mask[y0:y1, x0:x1].astype(np.uint8) * 255)
                          .resize((ow, oh), Image.Resampling.BILINEAR)) > 127
    top, left = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    region = np.zeros((h, w), bool)
    region[top:top + oh, left:left + ow] = obj_mask
    canvas = image.copy()
    canvas[top:top + oh, left:left + ow] = obj
    return np.where(region[..., None], canvas, image), region


# -- the edit object ----------------------------------------------------------------------------------

class SemanticEdit:
    """A named semantic edit, used like a ``Manipulation``; subclasses define ``edit``."""

    family = "semantic"
    grid_op = None
    box = None
    needs_mask = False       # the photo's own object mask must be usable
    made_by = "classical (OpenCV)"  # what makes the edit, as the pages say it
    partner: str | None = None  # "image": another photo of the bound views; "object": one with a usable mask
    random = False           # the output depends on the seed
    cache_edits = True

    def __init__(self, name: str, params: dict, margin: float = 1 / 8, iterations: int = 5,
                 cache_root: str | Path | None = None):
        self.name = name
        self.params = dict(params)
        if self.needs_mask or self.partner == "object":
            self.params.update(mask_margin=float(margin), mask_iterations=int(iterations))
        self.cache_root = Path(cache_root) if cache_root else None
        self.skipped: dict[str, str] = {}
        self.skipped_kinds: dict[str, str] = {}
        self.edits_made = self.cache_hits = 0
        self._views: dict[str, View] | None = None
        self._image_of: Callable[[View], np.ndarray] | None = None
        self._partners: dict[tuple[int, str], View] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params})"

    @property
    def root(self) -> Path:
        return self.cache_root or default_cache_dir()

    # -- context ---------------------------------------------------------------------------------

    def bind(self, views: list[View], image_of: Callable[[View], np.ndarray]) -> "SemanticEdit":
        """Returns self, bound to one split part's views and a view -> working-size uint8 image function."""
        by_key = {v.key: v for v in views}
        if len(by_key) != len(views):
            raise ValueError(f"{self.name}: bind got {len(views) - len(by_key)} repeated view keys")
        self._views, self._image_of = by_key, image_of
        self._partners = {}
        return self

    def _bound(self) -> tuple[dict[str, View], Callable[[View], np.ndarray]]:
        if self._views is None:
            raise RuntimeError(f"{self.name} is not bound: call edit.bind(views of one split part, "
                               "lambda v: store.image(v, None)) before using it")
        return self._views, self._image_of

    def identity(self) -> dict:
        """Returns what else identifies this editor's output (weights, files); empty for pixel editors."""
        return {}

    def cache_key(self, seed: int) -> dict:
        """Returns what identifies this edit's output for a given image: editor, parameters, seed where it
        matters, the photos partners are drawn from, the segmenter's version, the weights."""
        key = {"name": self.name, "family": self.family, "params": self.params, **self.identity()}
        if self.random or self.partner:
            key["seed"] = int(seed)
        if self.partner:
            views, _ = self._bound()
            key["partners_from"] = content_key(sorted((k, v.photo.sha256) for k, v in views.items()))
        if self.needs_mask or self.partner == "object":
            key["segmenter"] = segmenter_identity()
        return key

    def check_grid(self, height: int, width: int, layer: str = "?") -> None:
        """Accepts every grid: a semantic edit has no spatial structure to register."""

    # -- masks and partners ----------------------------------------------------------------------

    def mask(self, image: np.ndarray) -> ObjectMask:
        """Returns the (cached) object mask of ``image`` with this edit's GrabCut settings."""
        return object_mask(image, self.params.get("mask_margin", 1 / 8), self.params.get("mask_iterations", 5),
                           cache_root=self.root)

    def partner_of(self, item: str, seed: int) -> View:
        """Returns the bound view another photo's pixels come from for ``item``, drawn from (seed, item)."""
        views, image_of = self._bound()
        if (seed, item) in self._partners:
            return self._partners[seed, item]
        photo = item.rpartition("#")[0]
        keys = sorted(k for k, v in views.items() if v.photo.id != photo)
        for i in rng_for(seed, "partner", self.name, item).permutation(len(keys)):
            view = views[keys[i]]
            if self.partner != "object" or self.mask(image_of(view)).ok:
                self._partners[seed, item] = view
                return view
        raise SkippedItem(f"{self.name}: no other photo among the {len(views)} bound views"
                          + (" has a usable object mask" if self.partner == "object" else ""), "no partner photo")

    def _check(self, item: str, image: np.ndarray | None, seed: int = 0) -> None:
        """Raises SkippedItem (and records why) when ``item`` cannot be edited honestly."""
        try:
            if self.needs_mask:
                m = self.mask(image)
                if not m.ok:
                    raise SkippedItem(f"{self.name}: object mask failed: {m.reason}", m.kind)
            if self.partner:
                self.partner_of(item, seed)
        except SkippedItem as e:
            self.skipped[item] = str(e)
            self.skipped_kinds[item] = e.kind
            raise

    def usable(self, views: list[View], seed: int = 0) -> list[View]:
        """Returns the views this edit can edit honestly; ``skipped`` records why each other one is not."""
        _, image_of = self._bound()
        keep = []
        for view in views:
            try:
                self._check(view.key, image_of(view) if self.needs_mask else None, seed)
            except SkippedItem:
                continue
            keep.append(view)
        return keep

    # -- editing ---------------------------------------------------------------------------------

    def edit(self, image: np.ndarray, seed: int, item: str) -> np.ndarray:
        """Returns the edited image; subclasses implement it (``_check`` has passed)."""
        raise NotImplementedError

    def __call__(self, image: np.ndarray, seed: int = 0, item: str = "") -> np.ndarray:
        """Returns the edited copy of ``image`` (same shape, uint8), from the edit cache when present.

        Raises SkippedItem for an item it cannot edit honestly (see ``usable``).
        """
        _check_image(image)
        self._check(item, image, seed)
        identity = {"edit": self.cache_key(seed), "seed": int(seed), "item": item, "image": image_digest(image)}
        if self.partner:
            views, image_of = self._bound()
            identity["partner"] = image_digest(image_of(self.partner_of(item, seed)))
        key = content_key(identity)
        path = self.root / "edits" / key[:2] / f"{key}.png"

        def make() -> np.ndarray:
            out = self.edit(image, seed, item)
            if out.shape != image.shape or out.dtype != np.uint8:
                raise RuntimeError(f"{self.name} returned {out.dtype} {out.shape} for a {image.shape} uint8 image")
            self.edits_made += 1
            return np.ascontiguousarray(out)

        def load(p: Path) -> np.ndarray:
            stored = load_png(p, image.shape)
            self.cache_hits += 1
            return stored

        return cached(path, load, make, save_png) if self.cache_edits else make()
