"""The offline object-level editors, the registry of editors (generative ones included), and ``SplitEdit``.

Editors whose target is a function of the photo alone (recolour, remove, blur, grey) are cases a map may
learn; editors that take another photo's pixels (``background_swap``, ``object_paste``) have ``control =
True``: their target is not a function of the original, so they are negative controls (``is_control``).
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable

import numpy as np

from featmap.core.registry import Registry
from featmap.core.seeding import rng_for
from featmap.data.images import View
from featmap.edits.semantic import (
    COLOURS,
    SemanticEdit,
    grow,
    inpaint,
    parse_colour,
    paste,
    recolour,
)
from featmap.edits.style import SCOPES, style_editor
from featmap.edits.style_networks import NUM_STYLES


def blur_inside(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Returns ``image`` with the pixels inside ``mask`` Gaussian-blurred over the mask only (normalised
    convolution: no outside colour bleeds in), ``sigma`` a fraction of the shorter side; outside untouched."""
    import cv2

    px = sigma * min(mask.shape)
    m = mask.astype(np.float32)
    num = cv2.GaussianBlur(image.astype(np.float32) * m[..., None], (0, 0), px, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(m, (0, 0), px, borderType=cv2.BORDER_REFLECT)
    blurred = np.clip(np.round(num / np.maximum(den, 1e-6)[..., None]), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], blurred, image)


def gray_inside(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Returns ``image`` with the pixels inside ``mask`` set to their ITU-R 601-2 luma (as ``grayscale``)."""
    from PIL import Image

    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.where(mask[..., None], luma[..., None], image)


class ObjectRecolour(SemanticEdit):
    """Sets the object's hue to a target colour ("change the body colour to blue")."""

    needs_mask = True
    control = False

    def __init__(self, colour: str | tuple = "blue", saturation: float = 0.6, margin: float = 1 / 8,
                 iterations: int = 5, cache_root: str | Path | None = None):
        self.colour = parse_colour(colour)
        if not 0 <= saturation <= 1:
            raise ValueError(f"saturation must be in [0, 1], got {saturation}")
        super().__init__("object_recolor", {"colour": "#%02x%02x%02x" % self.colour,
                                            "saturation": float(saturation)},
                         margin=margin, iterations=iterations, cache_root=cache_root)

    def edit(self, image, seed, item):
        return recolour(image, self.mask(image).mask, self.colour, self.params["saturation"])


class ObjectRemove(SemanticEdit):
    """Fills the object (grown by a margin for its halo) from its surroundings ("remove the car")."""

    needs_mask = True
    control = False

    def __init__(self, grow: float = 0.02, radius: int = 5, margin: float = 1 / 8, iterations: int = 5,
                 cache_root: str | Path | None = None):
        if not 0 <= grow < 0.5:
            raise ValueError(f"grow must be a fraction of the side in [0, 0.5), got {grow}")
        super().__init__("object_remove", {"grow": float(grow), "radius": int(radius)},
                         margin=margin, iterations=iterations, cache_root=cache_root)

    def region(self, image: np.ndarray) -> np.ndarray:
        """Returns the (H, W) bool region this edit fills: the object mask grown by ``grow``."""
        return grow(self.mask(image).mask, self.params["grow"])

    def edit(self, image, seed, item):
        return inpaint(image, self.region(image), self.params["radius"])


class ObjectBlur(SemanticEdit):
    """Blurs the object and keeps the rest sharp ("blur the dog"); ``sigma`` is a fraction of the shorter side."""

    needs_mask = True
    control = False

    def __init__(self, sigma: float = 0.02, margin: float = 1 / 8, iterations: int = 5,
                 cache_root: str | Path | None = None):
        if not 0 < sigma <= 0.25:
            raise ValueError(f"sigma must be a fraction of the shorter side in (0, 0.25], got {sigma}")
        super().__init__("object_blur", {"sigma": float(sigma)}, margin=margin, iterations=iterations,
                         cache_root=cache_root)

    def edit(self, image, seed, item):
        return blur_inside(image, self.mask(image).mask, self.params["sigma"])


class ObjectGray(SemanticEdit):
    """Turns the object grey (its luma) and keeps the rest in colour ("make the car grey")."""

    needs_mask = True
    control = False

    def __init__(self, margin: float = 1 / 8, iterations: int = 5, cache_root: str | Path | None = None):
        super().__init__("object_gray", {}, margin=margin, iterations=iterations, cache_root=cache_root)

    def edit(self, image, seed, item):
        return gray_inside(image, self.mask(image).mask)


class BackgroundSwap(SemanticEdit):
    """Keeps the object and takes everything else from another photo of the same split part."""

    needs_mask = True
    partner = "image"
    control = True  # the new background is another photo's: not a function of the original

    def __init__(self, margin: float = 1 / 8, iterations: int = 5,
                 cache_root: str | Path | None = None):
        super().__init__("background_swap", {}, margin=margin, iterations=iterations, cache_root=cache_root)

    def edit(self, image, seed, item):
        _, image_of = self._bound()
        background = image_of(self.partner_of(item, seed))
        if background.shape != image.shape:
            raise ValueError(f"{self.name}: image_of gave a {background.shape} partner for a {image.shape} image")
        return np.where(self.mask(image).mask[..., None], image, background)


class ObjectPaste(SemanticEdit):
    """Adds the object of another photo of the same split part, scaled, at a seeded position ("add a bear")."""

    partner = "object"
    control = True  # the pasted object is another photo's: not a function of the original

    def __init__(self, scale: float = 0.5, margin: float = 1 / 8, iterations: int = 5,
                 cache_root: str | Path | None = None):
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        super().__init__("object_paste", {"scale": float(scale)},
                         margin=margin, iterations=iterations, cache_root=cache_root)

    def pasted(self, image: np.ndarray, seed: int, item: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (the edited image, the (H, W) bool region the pasted object covers)."""
        _, image_of = self._bound()
        source = image_of(self.partner_of(item, seed))
        return paste(image, source, self.mask(source).mask, self.params["scale"],
                     rng_for(seed, "paste", item))

    def edit(self, image, seed, item):
        return self.pasted(image, seed, item)[0]


# -- the registry -------------------------------------------------------------------------------------

def _generative(kind: str) -> Callable[..., SemanticEdit]:
    from featmap.edits.generative import (
        GenerativeEdit,  # imported on use: it pulls in torch-heavy diffusers code paths
    )

    return functools.partial(GenerativeEdit, kind)


def _recolour_preset(colour: str) -> Callable[..., ObjectRecolour]:
    """Returns a factory of ``object_recolor`` with the colour fixed, named ``object_recolor_<colour>``."""

    def make(saturation: float = 0.6, margin: float = 1 / 8, iterations: int = 5,
             cache_root: str | Path | None = None) -> ObjectRecolour:
        edit = ObjectRecolour(colour, saturation, margin=margin, iterations=iterations, cache_root=cache_root)
        edit.name = f"object_recolor_{colour}"
        return edit

    make.__doc__ = f"Returns ``object_recolor`` with colour {colour} {COLOURS[colour]}, named object_recolor_{colour}."
    return make


EDITORS: Registry[Callable[..., SemanticEdit]] = Registry("editor")
EDITORS.add("object_recolor", lambda: ObjectRecolour)
for _colour in COLOURS:  # one case per fixed colour: object_recolor_red, object_recolor_green, ...
    EDITORS.add(f"object_recolor_{_colour}", lambda c=_colour: _recolour_preset(c))
EDITORS.add("object_remove", lambda: ObjectRemove)
EDITORS.add("object_blur", lambda: ObjectBlur)
EDITORS.add("object_gray", lambda: ObjectGray)
EDITORS.add("background_swap", lambda: BackgroundSwap)
EDITORS.add("object_paste", lambda: ObjectPaste)
for _kind in ("instruct_pix2pix", "qwen_image_edit", "inpaint"):
    EDITORS.add(_kind, lambda k=_kind: _generative(k))
for _scope, _prefix in SCOPES.items():  # style, style_<index>, style_<index>_<percent>, and their object_ forms
    EDITORS.add(_prefix, lambda s=_scope: style_editor(s))
    EDITORS.add_pattern(_prefix + r"_(\d+)", f"{_prefix}_<index 0-{NUM_STYLES - 1}>",
                        lambda i, s=_scope: style_editor(s, int(i)))
    EDITORS.add_pattern(_prefix + r"_(\d+)_(\d+)", f"{_prefix}_<index>_<strength percent>",
                        lambda i, p, s=_scope: style_editor(s, int(i), int(p)))


def is_control(name: str) -> bool:
    """Returns whether ``name`` is an editor whose target depends on another photo (``control = True``: a
    negative control, never a case). False for every other name, manipulations and manifest edits included."""
    if not EDITORS.has(name):
        return False
    factory = EDITORS.get(name)
    return bool(getattr(getattr(factory, "func", factory), "control", False))


def get_editor(name: str, **params) -> SemanticEdit:
    """Returns a new editor ``name`` with ``params`` (unknown names and parameters list the known ones)."""
    factory = EDITORS.get(name)
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as e:
        raise TypeError(f"editor {name!r} takes {inspect.signature(factory)}; got {params}: {e}") from None
    return factory(**params)


class SplitEdit:
    """One semantic edit bound separately to each split part, used like a ``Manipulation`` by the pipeline.

    Partners (``background_swap``, ``object_paste``) are drawn within a part, so a test photo never borrows
    pixels from a training photo. ``usable[part]`` lists the views each part can edit honestly; ``skipped``
    says why the others were left out.
    """

    family = "semantic"
    grid_op = None
    box = None

    def __init__(self, make: Callable[[], SemanticEdit], parts: dict[str, list[View]],
                 image_of: Callable[[View], np.ndarray], seed: int):
        self.parts = {part: make().bind(views, image_of) for part, views in parts.items()}
        first = next(iter(self.parts.values()))
        self.name, self.params, self.random = first.name, first.params, first.random
        self.control = bool(getattr(first, "control", False))
        self.made_by, self.needs_mask = first.made_by, first.needs_mask
        self._part_of = {v.key: part for part, views in parts.items() for v in views}
        self.usable = {part: edit.usable(parts[part], seed) for part, edit in self.parts.items()}

    def __repr__(self) -> str:
        return f"SplitEdit({self.name!r}, {self.params})"

    @property
    def skipped(self) -> dict[str, str]:
        """Returns {view key: why it was left out} over all parts."""
        return {k: v for edit in self.parts.values() for k, v in edit.skipped.items()}

    def skip_kinds(self) -> dict[str, str]:
        """Returns {view key: the reason's kind} over all parts (see ``SkippedItem.kind``)."""
        return {k: v for edit in self.parts.values() for k, v in getattr(edit, "skipped_kinds", {}).items()}

    @property
    def edits_made(self) -> int:
        return sum(edit.edits_made for edit in self.parts.values())

    def __call__(self, image: np.ndarray, seed: int = 0, item: str = "") -> np.ndarray:
        """Returns the edited copy of ``image`` by the edit bound to ``item``'s part."""
        if item not in self._part_of:
            raise KeyError(f"{self.name}: view {item!r} is in no bound split part")
        return self.parts[self._part_of[item]](image, seed, item)

    def cache_key(self, seed: int) -> dict:
        """Returns the parts' cache keys together (each part's partners are part of what identifies the edit)."""
        return {"name": self.name, "parts": {part: edit.cache_key(seed) for part, edit in self.parts.items()}}

    def check_grid(self, height: int, width: int, layer: str = "?") -> None:
        """Accepts every grid: a semantic edit has no spatial structure to register."""

    def mask(self, view: View, image: np.ndarray) -> np.ndarray | None:
        """Returns the object mask this edit used for ``view`` (None for edits that use no mask)."""
        edit = self.parts[self._part_of[view.key]]
        return edit.mask(image).mask if edit.needs_mask else None
