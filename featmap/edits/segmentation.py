"""Object masks without a model: OpenCV GrabCut from a centred box, failure detection, a lossless cache.

A mask is a pure function of the image's pixels and the GrabCut settings, so it is cached under the
content key of both (``<cache_root>/masks/<key>.png``) and a rerun segments nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featmap.core.io import cached, content_key, default_cache_dir

# A mask under this share of the image found no object; GrabCut cannot label anything outside the
# initial box, so "nearly everything" is measured inside the box: over this share, nothing was separated.
MIN_FRACTION = 0.03
MAX_BOX_FRACTION = 0.95


@dataclass(frozen=True)
class ObjectMask:
    """A foreground mask (H, W) bool, its share of the image, and whether it is usable (and why not)."""

    mask: np.ndarray
    fraction: float
    ok: bool
    reason: str = ""
    kind: str = ""  # the reason in a few words, for counting: "no object found", "object not separated"


def image_digest(image: np.ndarray) -> str:
    """Returns the sha256 of an image's shape, dtype and pixels: its identity in every edit cache key."""
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def centred_box(height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """Returns GrabCut's initial rectangle (x, y, w, h): the image less ``margin`` of each side."""
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be a fraction of the side in [0, 0.5), got {margin}")
    mx, my = round(margin * width), round(margin * height)
    return mx, my, width - 2 * mx, height - 2 * my


def judge_mask(mask: np.ndarray, margin: float) -> ObjectMask:
    """Returns ``mask`` with its foreground fraction and a verdict: too small or the whole box is a failure."""
    h, w = mask.shape
    fraction = float(mask.mean())
    x, y, bw, bh = centred_box(h, w, margin)
    in_box = float(mask[y:y + bh, x:x + bw].mean()) if bw * bh else 0.0
    if fraction < MIN_FRACTION:
        return ObjectMask(mask, fraction, False,
                          f"foreground is {fraction:.1%} of the image, under {MIN_FRACTION:.0%}: no object found",
                          "no object found")
    if in_box > MAX_BOX_FRACTION:
        return ObjectMask(mask, fraction, False,
                          f"foreground fills {in_box:.1%} of the initial box, over {MAX_BOX_FRACTION:.0%}: "
                          "object and background were not separated", "object not separated")
    return ObjectMask(mask, fraction, True)


def _drop_specks(mask: np.ndarray, keep: float = 0.25) -> np.ndarray:
    """Returns ``mask`` without connected parts under ``keep`` times the largest part's area.

    GrabCut leaves specks of background-coloured foreground; an edit should act on the object (or the
    several similar objects: a bowl of strawberries), not on the specks."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    return np.isin(labels, 1 + np.nonzero(areas >= keep * areas.max())[0])


def grabcut_mask(image: np.ndarray, margin: float = 1 / 8, iterations: int = 5) -> np.ndarray:
    """Returns GrabCut's (H, W) bool foreground (specks dropped) from a centred box, seeded."""
    import cv2

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"object_mask takes a (H, W, 3) uint8 RGB array, got "
                        f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    h, w = image.shape[:2]
    rect = centred_box(h, w, margin)
    if min(rect[2], rect[3]) < 2:
        raise ValueError(f"a {h}x{w} image is too small for a GrabCut box with margin {margin}")
    labels = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's global generator
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), labels, rect, bgd, fgd, int(iterations),
                cv2.GC_INIT_WITH_RECT)
    return _drop_specks((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD))


def segmenter_identity() -> dict:
    """Returns what identifies the segmenter's output besides its settings: method, cleanup, OpenCV version."""
    import cv2

    return {"method": "grabcut, centred box", "cleanup": "drop parts under 1/4 of the largest",
            "opencv": cv2.__version__}


def object_mask(image: np.ndarray, margin: float = 1 / 8, iterations: int = 5,
                cache_root: str | Path | None = None) -> ObjectMask:
    """Returns the judged GrabCut object mask of ``image`` (uint8 RGB), from the cache when present."""
    key = content_key({**segmenter_identity(), "image": image_digest(image), "margin": float(margin),
                       "iterations": int(iterations)})
    path = Path(cache_root or default_cache_dir()) / "masks" / key[:2] / f"{key}.png"

    def load(p: Path) -> np.ndarray:
        with Image.open(p) as stored:
            mask = np.asarray(stored.convert("L")) > 127
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{p} holds a {mask.shape} mask for a {image.shape[:2]} image")
        return mask

    mask = cached(path, load, lambda: grabcut_mask(image, margin, iterations),
                  lambda f, m: save_png(f, m.astype(np.uint8) * 255))
    return judge_mask(mask, margin)


def save_png(file, image: np.ndarray) -> None:
    """Writes ``image`` (uint8, (H, W) or (H, W, 3)) to the open binary ``file`` as a lossless PNG.

    zlib level 1: a 224 px edit encodes in 3.9 ms against 11.7 ms at PIL's default 6, for 1.4% more bytes (the
    semantic chapter writes about 1,300 edits cold); the pixels read back are the same."""
    Image.fromarray(image).save(file, format="PNG", compress_level=1)
