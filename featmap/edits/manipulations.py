"""Image manipulations: pure, seeded, resolution-independent functions on uint8 RGB images.

Every manipulation takes and returns a (H, W, 3) uint8 array. Names follow the reference protocol
(rotation_90, mirror_h, noise_40, hue_shift_60, grayscale, mask_big_square_center, ...); parameterised
variants (rotation_<multiple of 90>, noise_<sigma>, hue_shift_<PIL hue units>,
mask_<x0>_<y0>_<x1>_<y1>_<rrggbb>) come from the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from featmap.core.registry import Registry
from featmap.core.seeding import rng_for

FAMILIES = ("geometric", "photometric", "masking")


@dataclass(frozen=True)
class Manipulation:
    """A named image edit; ``grid_op`` is the matching feature-grid rotation/flip for geometric edits (exact on the
    grid; how well it lines up with real features depends on the network's padding: see the layers chapter)."""

    name: str
    family: str
    edit: Callable[[np.ndarray, np.random.Generator], np.ndarray] = field(repr=False, compare=False)
    params: tuple = ()
    random: bool = False
    grid_op: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    box: tuple[float, float, float, float] | None = None  # masks: (x0, y0, x1, y1) as fractions of the side

    def __call__(self, image: np.ndarray, seed: int = 0, item: str = "") -> np.ndarray:
        """Returns the manipulated copy of ``image``; random edits draw from a generator seeded by (seed, item)."""
        _check_image(image)
        rng = rng_for(seed, "manipulation", self.name, item)
        out = self.edit(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
        return np.ascontiguousarray(out)

    def cache_key(self, seed: int) -> dict:
        """Returns what identifies this edit's output for a given image (seed only where it matters)."""
        key = {"name": self.name, "params": list(self.params)}
        if self.random:
            key["seed"] = int(seed)
        return key

    def check_grid(self, height: int, width: int, layer: str = "?") -> None:
        """Raises ValueError when a (height, width) feature grid is too small for this manipulation."""
        if self.family == "geometric" and min(height, width) < 2:
            raise ValueError(
                f"layer {layer} has a {height}x{width} feature grid: too small for {self.name}, which "
                "needs at least 2x2 cells; choose an earlier layer")
        if self.grid_op is not None and height != width and self.name.startswith("rotation"):
            k = self.params[0] // 90 % 4
            if k % 2:
                raise ValueError(
                    f"layer {layer} has a non-square {height}x{width} grid; {self.name} needs a square one")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            cells = min((x1 - x0) * width, (y1 - y0) * height)
            if cells < 0.5:
                raise ValueError(
                    f"layer {layer} has a {height}x{width} feature grid: {self.name} covers {cells:.2f} "
                    "cells across, under the half cell it needs to register; choose an earlier layer")


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise TypeError(f"a manipulation takes a (H, W, 3) uint8 RGB array, got {got}")


# -- geometric ---------------------------------------------------------------------------------------

def rotation(degrees: int) -> Manipulation:
    """Returns a counter-clockwise rotation (PIL's direction) by a multiple of 90 degrees, lossless."""
    degrees = int(degrees)
    if degrees % 90:
        raise ValueError(f"rotation angle must be a multiple of 90 degrees (a permutation of the grid), got {degrees}")
    k = degrees // 90 % 4
    return Manipulation(
        name=f"rotation_{degrees}", family="geometric", params=(degrees,),
        edit=lambda img, rng: np.rot90(img, k, axes=(0, 1)),
        grid_op=lambda x: torch.rot90(x, k, dims=(-2, -1)))


def mirror(axis: str) -> Manipulation:
    """Returns a mirror: ``h`` swaps left and right, ``v`` swaps top and bottom."""
    if axis not in ("h", "v"):
        raise ValueError(f"mirror axis must be 'h' or 'v', got {axis!r}")
    img_axis, grid_dim = (1, -1) if axis == "h" else (0, -2)
    return Manipulation(
        name=f"mirror_{axis}", family="geometric", params=(axis,),
        edit=lambda img, rng: np.flip(img, axis=img_axis),
        grid_op=lambda x: torch.flip(x, dims=(grid_dim,)))


# -- photometric -------------------------------------------------------------------------------------

def gaussian_noise(sigma: float) -> Manipulation:
    """Returns additive Gaussian noise, sigma on the 0-255 scale, truncated to integers, clipped."""
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"noise sigma must be positive, got {sigma}")

    def edit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.normal(0.0, sigma, img.shape).astype(np.int16)  # truncation toward 0, as the reference
        return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    return Manipulation(name=f"noise_{sigma:g}", family="photometric", params=(sigma,), random=True, edit=edit)


def hue_shift(shift: int) -> Manipulation:
    """Returns a hue rotation by ``shift`` in PIL HSV units (256 = a full turn; 60 is about 84 degrees)."""
    shift = int(shift)

    def edit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
        return np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))

    return Manipulation(name=f"hue_shift_{shift}", family="photometric", params=(shift,), edit=edit)


def grayscale() -> Manipulation:
    """Returns ITU-R 601-2 luma (PIL ``L``) copied to three channels."""
    return Manipulation(
        name="grayscale", family="photometric",
        edit=lambda img, rng: np.array(Image.fromarray(img).convert("L").convert("RGB")))


# -- masking -----------------------------------------------------------------------------------------

def mask(box: tuple[float, float, float, float], colour: tuple[int, int, int], name: str | None = None) -> Manipulation:
    """Returns a filled square: ``box`` = (x0, y0, x1, y1) as fractions of the side (x1, y1 exclusive)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"mask box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
    colour = tuple(int(c) for c in colour)
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"mask colour must be three integers in 0..255, got {colour}")

    def edit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        out = img.copy()
        out[round(y0 * h):max(round(y1 * h), round(y0 * h) + 1),
            round(x0 * w):max(round(x1 * w), round(x0 * w) + 1)] = colour
        return out

    default = "mask_{:g}_{:g}_{:g}_{:g}_{:02x}{:02x}{:02x}".format(x0, y0, x1, y1, *colour)
    return Manipulation(name=name or default, family="masking", params=((x0, y0, x1, y1), colour),
                        box=(x0, y0, x1, y1), edit=edit)


def _reference_mask(name: str, x0: int, x1: int, colour: tuple[int, int, int]) -> Manipulation:
    # The reference draws inclusive polygons on a 288 px crop; as fractions, end + 1 is exclusive.
    return mask((x0 / 288, x0 / 288, (x1 + 1) / 288, (x1 + 1) / 288), colour, name=name)


# What a valid name looks like, for the parameterised forms a value can make invalid.
_VALID = {
    "rotation_": "rotation_90, rotation_180 or rotation_270 (any multiple of 90 degrees)",
    "noise_": "a positive sigma on the 0-255 scale, e.g. noise_40",
    "mask_": "mask_<x0>_<y0>_<x1>_<y1>_<rrggbb> with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, e.g. "
             "mask_0.1_0.1_0.6_0.6_ff00ff",
}


class _ManipulationRegistry(Registry[Manipulation]):
    """The registry of manipulations, whose refusals name the parameter the name came from and a valid form."""

    def get(self, name: str) -> Manipulation:
        try:
            return super().get(name)
        except ValueError as e:  # a known form with a value it cannot take (an unknown name is a KeyError)
            valid = next((v for prefix, v in _VALID.items() if name.startswith(prefix)), ", ".join(self.names()))
            raise ValueError(f"{name!r} in the manipulations (or inverter_manipulations) parameter is not a valid "
                             f"manipulation: {e}; use {valid}") from e


MANIPULATIONS: Registry[Manipulation] = _ManipulationRegistry("manipulation")
for _deg in (90, 180, 270):
    MANIPULATIONS.add(f"rotation_{_deg}", lambda d=_deg: rotation(d))
MANIPULATIONS.add("mirror_h", lambda: mirror("h"))
MANIPULATIONS.add("mirror_v", lambda: mirror("v"))
MANIPULATIONS.add("noise_40", lambda: gaussian_noise(40))
MANIPULATIONS.add("hue_shift_60", lambda: hue_shift(60))
MANIPULATIONS.add("grayscale", grayscale)
MANIPULATIONS.add("mask_top_left_square", lambda: _reference_mask("mask_top_left_square", 26, 103, (255, 0, 0)))
MANIPULATIONS.add("mask_bottom_right_square",
                  lambda: _reference_mask("mask_bottom_right_square", 180, 270, (0, 255, 0)))
MANIPULATIONS.add("mask_big_square_center", lambda: _reference_mask("mask_big_square_center", 90, 193, (0, 0, 255)))
MANIPULATIONS.add("mask_small_square_center",
                  lambda: _reference_mask("mask_small_square_center", 116, 154, (255, 255, 0)))
MANIPULATIONS.add_pattern(r"rotation_(-?\d+)", "rotation_<multiple of 90>", lambda d: rotation(int(d)))
MANIPULATIONS.add_pattern(r"noise_(\d+(?:\.\d+)?)", "noise_<sigma>", lambda s: gaussian_noise(float(s)))
MANIPULATIONS.add_pattern(r"hue_shift_(-?\d+)", "hue_shift_<PIL hue units>", lambda s: hue_shift(int(s)))
_F = r"(0(?:\.\d+)?|1(?:\.0+)?)"
MANIPULATIONS.add_pattern(
    rf"mask_{_F}_{_F}_{_F}_{_F}_([0-9a-fA-F]{{6}})", "mask_<x0>_<y0>_<x1>_<y1>_<rrggbb>",
    lambda x0, y0, x1, y1, hexc: mask((float(x0), float(y0), float(x1), float(y1)),
                                      tuple(int(hexc[i:i + 2], 16) for i in (0, 2, 4))))

REFERENCE_SETS = {
    "geometric": ["rotation_90", "rotation_180", "rotation_270", "mirror_h", "mirror_v"],
    "photometric": ["noise_40", "hue_shift_60", "grayscale"],
    "masking": ["mask_top_left_square", "mask_bottom_right_square", "mask_big_square_center",
                "mask_small_square_center"],
}


def get_manipulation(name: str) -> Manipulation:
    """Returns the manipulation registered under ``name`` (unknown names list the known ones)."""
    return MANIPULATIONS.get(name)
