"""Photos: the embedded default set, user folders, one RGB conversion boundary, views and splits.

Every image enters featmap through ``load_rgb`` (any mode, size or bit depth -> RGB uint8) and
``ImageSet.view`` (-> a square uint8 view at the configured size, the model's own crop and
interpolation). Splits are by group of source photos: all views of a photo, its near-duplicates (a
perceptual hash robust to resizing, recompression, crops and a mirror) and the other shots of its subject
(named by the data, e.g. the GCompris manifest) stay on one side.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from featmap.core.io import cached, content_key, default_cache_dir
from featmap.core.memo import ArrayMemo
from featmap.core.seeding import derive_seed, rng_for

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
VIEW_MEMO_BYTES = 96 << 20  # views kept per process by ImageSet.view, at most this many bytes (a 224 px view: 147 KiB)
_VIEWS = ArrayMemo()
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class ImageLoadError(ValueError):
    """An image file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Photo:
    """One source photo: a stable id, where it came from, its label and licence, and its bytes' hash.

    ``subject`` names what the photo shows where the data says so (GCompris: the author and the source file
    name up to a trailing shot number, so ``Windmill_Linda_1`` and ``_2`` share one); photos with one
    subject stay on one side of a split. Empty when unknown.
    """

    id: str
    path: Path
    source: str
    label: str
    licence: str
    sha256: str = field(compare=False)
    subject: str = field(default="", compare=False)

    @property
    def imagenet_index(self) -> int | None:
        """Returns the ImageNet-1k class index where the label is one (``imagenet_<index>``), else None."""
        head, _, tail = self.label.rpartition("_")
        return int(tail) if head == "imagenet" and tail.isdigit() else None


# Photos of up to this many pixels are read: a 200-megapixel phone photo, a 20,000 x 12,500 panorama. Reading one
# takes about 13 bytes a pixel at its peak (measured: a 100-megapixel JPEG, 1.3 GB and 1 s; 3.3 GB at the bound).
# PIL's own guard against decompression bombs stops at 89 megapixels; a larger photo than the bound is refused by
# name unless $FEATMAP_MAX_PIXELS allows it.
MAX_PIXELS = 250_000_000
MAX_PIXELS_ENV = "FEATMAP_MAX_PIXELS"
_PIL_LIMIT = threading.Lock()  # PIL reads its limit from a module global: set it for one decode at a time


@contextmanager
def _pil_limit(pixels: int | None):
    """Sets PIL's decompression-bomb limit (None: none) while PIL reads under it, one read at a time; load_rgb
    applies featmap's own bound to the header's size instead."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def max_pixels() -> int:
    """Returns the largest photo (in pixels) ``load_rgb`` reads: ``$FEATMAP_MAX_PIXELS``, else ``MAX_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${MAX_PIXELS_ENV} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def load_rgb(path: str | Path) -> np.ndarray:
    """Returns the image at ``path`` as (H, W, 3) uint8 RGB (EXIF orientation applied).

    Grey, palette, alpha (composited on white), 16-bit, 32-bit integer and float images are converted
    here and nowhere else. Photos over ``max_pixels()`` are refused naming the file and its size.
    """
    path = Path(path)
    limit = max_pixels()
    try:
        with _pil_limit(None), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > limit:
                    raise ImageLoadError(
                        f"image {path} has {img.width} x {img.height} = {img.width * img.height:,} pixels, over "
                        f"the {limit:,} featmap reads (reading takes about 13 bytes a pixel at its peak); to "
                        f"read it, set {MAX_PIXELS_ENV}={img.width * img.height} in the environment, or shrink it")
                Image.MAX_IMAGE_PIXELS = limit  # what a format's own checks (GIF frames, ...) hold to
                img.load()
                img = ImageOps.exif_transpose(img)
    except (FileNotFoundError, ImageLoadError):
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise ImageLoadError(f"image {path} has zero size {img.size}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def square_view(image: np.ndarray, size: int, interpolation: str = "bicubic", crop_pct: float = 1.0,
                random_crop: tuple[int, int, int] | None = None) -> np.ndarray:
    """Returns a (size, size, 3) uint8 view of ``image``.

    Without ``random_crop``: the model's evaluation crop (shorter side to size / crop_pct, centre crop).
    With ``random_crop`` = (seed, scale_min*100, flip allowed): a seeded random resized crop and flip.
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    resample = _INTERPOLATION[interpolation]
    # Large crops slice the array: PIL's crop refuses boxes over its 89-megapixel guard, which load_rgb lifts.
    if random_crop is None:
        h, w = image.shape[:2]
        if max(w, h) > 4 * min(w, h):
            # A long strip: keep only its centre, or the resized intermediate grows with its length
            # (a 1 x 4000 banner would become 256 x 1,024,000 pixels before the crop).
            keep = 4 * min(w, h)
            image = image[:, (w - keep) // 2:(w + keep) // 2] if w > h else image[(h - keep) // 2:(h + keep) // 2]
        pil = Image.fromarray(np.ascontiguousarray(image))
        w, h = pil.size
        scale = size / crop_pct / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(pil.crop((left, top, left + size, top + size)))
    from torchvision.transforms import RandomResizedCrop  # here: the pages that only read tables skip torchvision

    seed, scale_min, flip = random_crop
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shape_only = torch.empty(1, 1, 1).expand(1, *image.shape[:2])  # get_params reads the size only
        top, left, h, w = RandomResizedCrop.get_params(shape_only, scale=(scale_min / 100, 1.0), ratio=(3 / 4, 4 / 3))
        do_flip = bool(flip) and bool(torch.rand(1).item() < 0.5)
    pil = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w])).resize((size, size), resample)
    out = np.asarray(pil)
    return np.ascontiguousarray(out[:, ::-1]) if do_flip else out


@dataclass(frozen=True)
class View:
    """A photo and a view index: 0 is the evaluation crop, k > 0 a seeded random crop and flip."""

    photo: Photo
    index: int = 0

    @property
    def key(self) -> str:
        return f"{self.photo.id}#{self.index}"


@dataclass(frozen=True)
class Split:
    """Photos split three ways by source photo (validation photos are held out of the training photos)."""

    train: list[Photo]
    val: list[Photo]
    test: list[Photo]

    def views(self, part: str, train_views: int) -> list[View]:
        """Returns the views of one part: ``train_views`` per training or validation photo, 1 per test photo."""
        photos = getattr(self, part)
        n = 1 if part == "test" else train_views
        return [View(p, k) for p in photos for k in range(n)]


# -- near-duplicates and subjects: the groups a split keeps together -----------------------------------

_HASH_SIDE, _HASH_FREQ = 64, 16  # DCT of a 64 x 64 grey thumbnail; 16 x 16 low frequencies less DC
HASH_BITS = _HASH_FREQ ** 2 - 1  # 255
_CROP_SCALES = (0.94, 0.88, 0.82)  # crops compared against the other photo's whole frame, 3 x 3 anchors each
_HASH_VERSION = 1


def _dct_rows(n: int, k: int) -> np.ndarray:
    """Returns the first ``k`` rows of the orthonormal n-point DCT-II matrix."""
    rows = np.sqrt(2 / n) * np.cos(np.pi * (2 * np.arange(n) + 1) * np.arange(k)[:, None] / (2 * n))
    rows[0] /= np.sqrt(2)
    return rows


_DCT = _dct_rows(_HASH_SIDE, _HASH_FREQ)
# Hamming distance (of 255 bits) at or under which two photos are near-duplicates. Measured on the 239 default
# photos: every pair of distinct photos (28,441) lies 82 bits apart or more (0.1% under 89; the closest are
# two rooftop solar panels, two fish, two pliers); every copy of a photo made by halving, JPEG quality 20,
# +15% brightness, a mirror, crops of 3-8% a side (mirrored or not), a shift, or crop + resize + JPEG 60 lies
# within 58 bits of it, a one-sided 8% crop within 66 (1 of 239 over 64); crops of 12% a side fall out (68%
# within 64). 64, a quarter of the bits, keeps every such copy but one and stays 18 bits under distinct photos.
NEAR_DUPLICATE_BITS = 64
_HASH_MEMO: dict[tuple, np.ndarray] = {}


def _dct_hash(grey: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    thumb = np.asarray(grey.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX, box=box), np.float64)
    coeffs = (_DCT @ thumb @ _DCT.T).ravel()[1:]
    return np.packbits(np.append(coeffs > np.median(coeffs), False)).view(np.uint64)


def perceptual_hashes(image: np.ndarray) -> np.ndarray:
    """Returns (29, 4) uint64: 255-bit DCT hashes (pHash) of ``image``'s whole frame, its mirror, then 27 crops
    (scales 0.94, 0.88, 0.82 of each side at 3 x 3 anchors). Row 0 vs row 0 is the plain pHash distance;
    comparing one photo's frames with the other's crops makes it robust to a cropped or mirrored copy."""
    grey = Image.fromarray(image).convert("L")
    w, h = grey.size
    if min(w, h) > 256:  # box-filter down first: the hash looks at 64 x 64, the crops at most 4x that
        scale = 256 / min(w, h)
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
        w, h = grey.size
    rows = [_dct_hash(grey, (0, 0, w, h)), _dct_hash(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (0, 0, w, h))]
    for scale in _CROP_SCALES:
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        for fy in (0, 0.5, 1):
            for fx in (0, 0.5, 1):
                x, y = round(fx * (w - cw)), round(fy * (h - ch))
                rows.append(_dct_hash(grey, (x, y, x + cw, y + ch)))
    return np.stack(rows)


def photo_hashes(photo: Photo) -> np.ndarray:
    """Returns ``perceptual_hashes`` of the photo, cached by content (in memory and under the cache dir)."""
    stat = photo.path.stat()
    memo = (photo.sha256, str(photo.path), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASH_MEMO:
        compute = lambda: perceptual_hashes(load_rgb(photo.path))  # noqa: E731
        if photo.sha256:
            key = content_key({"phash": _HASH_VERSION, "sha256": photo.sha256, "bytes": stat.st_size})

            def load(path: Path) -> np.ndarray:
                arr = np.load(path, allow_pickle=False)
                if arr.dtype != np.uint64 or arr.shape != (2 + 9 * len(_CROP_SCALES), 4):
                    raise ValueError(f"stale hash entry {path}")
                return arr

            _HASH_MEMO[memo] = cached(default_cache_dir() / "phash" / key[:2] / f"{key}.npy", load, compute,
                                      lambda f, v: np.save(f, v))
        else:
            _HASH_MEMO[memo] = compute()
    return _HASH_MEMO[memo]


def hash_distances(hashes: np.ndarray, i: int) -> np.ndarray:
    """Returns (N,) bits between photo ``i`` and every photo of ``hashes`` (N, 29, 4): the least over one
    photo's whole frame or its mirror against the other's frame, mirror or crops, both ways round."""
    frames = hashes[:, :2]
    a = np.bitwise_count(hashes[i, :2, None, None, :] ^ hashes[None]).sum(-1).min(axis=(0, 2))
    b = np.bitwise_count(hashes[i, :, None, None, :] ^ frames[None]).sum(-1).min(axis=(0, 2))
    return np.minimum(a, b)


@dataclass(frozen=True)
class PhotoGroup:
    """Photos a split keeps on one side (ids sorted), and why they are one group (empty for a lone photo)."""

    ids: tuple[str, ...]
    reasons: tuple[str, ...] = ()


def group_photos(photos: list[Photo], near_duplicate_bits: int | None = NEAR_DUPLICATE_BITS) -> list[PhotoGroup]:
    """Returns the photos in groups, sorted by first id: photos sharing a ``subject``, and photos whose
    perceptual hashes lie within ``near_duplicate_bits`` (None: subjects only), joined transitively."""
    ids = [p.id for p in photos]
    parent = list(range(len(photos)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links: list[tuple[int, str]] = []
    by_subject: dict[str, list[int]] = {}
    for i, p in enumerate(photos):
        if p.subject:
            by_subject.setdefault(p.subject, []).append(i)
    for subject, members in by_subject.items():
        for j in members[1:]:
            parent[root(j)] = root(members[0])
        if len(members) > 1:
            links.append((members[0], f"same subject {subject!r}: {', '.join(ids[j] for j in members)}"))
    if near_duplicate_bits is not None and len(photos) > 1:
        hashes = np.stack([photo_hashes(p) for p in photos])
        for i in range(len(photos) - 1):
            dist = hash_distances(hashes, i)
            for j in np.flatnonzero(dist[i + 1:] <= near_duplicate_bits) + i + 1:
                parent[root(int(j))] = root(i)
                links.append((i, f"near-duplicate: {ids[i]} ~ {ids[j]} ({int(dist[j])}/{HASH_BITS} bits)"))
    members: dict[int, list[int]] = {}
    for i in range(len(photos)):
        members.setdefault(root(i), []).append(i)
    reasons: dict[int, list[str]] = {}
    for i, why in links:
        reasons.setdefault(root(i), []).append(why)
    return sorted((PhotoGroup(tuple(sorted(ids[i] for i in m)), tuple(reasons.get(r, ())))
                   for r, m in members.items()), key=lambda g: g.ids[0])


def _photo_files(folder: Path) -> list[Path]:
    """Returns the non-hidden files under ``folder`` (links to files included, dangling ones too), following linked
    folders, sorted; raises ValueError naming a linked folder that leads back into a folder it sits in (a loop)."""
    files: list[Path] = []

    def walk(directory: Path, above: frozenset[Path]) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # a link to a folder too: Path.rglob does not follow those
                real = entry.resolve()
                if real in above:
                    raise ValueError(f"image folder {folder}: {entry} links to {real}, a folder it sits in, so the "
                                     "photos would be read forever; remove the link or point it at another folder")
                walk(entry, above | {real})
            elif entry.is_file() or entry.is_symlink():
                files.append(entry)

    walk(folder, frozenset({folder.resolve()}))
    return sorted(files)


# A photo whose shorter side is under this share of the network's input side is upscaled over 4 times (4.6 with
# Lite0's 0.875 crop): under 1/16 of the pixels the network sees come from the photo, the rest is interpolation,
# and its features describe blur. The default photos' smallest side, 119 px, is over half of 224.
SMALL_PHOTO_FRACTION = 0.25
_SMALL_SEEN: set[tuple[str, int]] = set()


class SmallPhotoWarning(UserWarning):
    """A photo much smaller than the network's input."""


def _notice(message: str) -> None:
    """Tells the person running featmap: in a chapter of the book, on the progress stream the runner shows in the
    terminal (a page shows results, never warnings); elsewhere as a ``SmallPhotoWarning`` (stderr)."""
    from featmap.core.progress import stream

    out = stream() if "ipykernel" in sys.modules else None
    if out is not None:
        out.write(f"warning: {message}\n")
        out.flush()
    else:
        warnings.warn(message, SmallPhotoWarning, stacklevel=3)


class ImageSet:
    """An ordered, de-duplicated list of photos, with views and seeded splits by group of source photos.

    ``near_duplicate_bits`` is the perceptual-hash distance (of 255 bits) under which two photos are one
    group (None: group by subject only).
    """

    near_duplicate_bits: int | None = NEAR_DUPLICATE_BITS

    def __init__(self, photos: list[Photo], name: str = "custom"):
        if not photos:
            raise ValueError(f"image set {name!r} holds no photos")
        seen: dict[str, Photo] = {}
        for p in sorted(photos, key=lambda p: p.id):
            seen.setdefault(p.sha256, p)  # the same photo twice would sit on both sides of a split
        self.photos = sorted(seen.values(), key=lambda p: p.id)
        self.name = name
        self.duplicates = len(photos) - len(self.photos)
        self.skipped: list[str] = []
        self._groups: tuple[tuple, list[PhotoGroup]] | None = None

    def __len__(self) -> int:
        return len(self.photos)

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> "ImageSet":
        """Returns the embedded default: vendored GCompris photos plus photos bundled in installed wheels."""
        return cls(gcompris_photos() + foolbox_photos() + bundled_photos(), name="default")

    @classmethod
    def from_folder(cls, folder: str | Path, skip_bad: bool = False) -> "ImageSet":
        """Returns the photos of a flat folder, or of one subfolder per class (names become labels).

        Every non-hidden file must be a readable image; ``skip_bad`` skips (and records) the others. Linked folders
        and files are followed (a link to a folder it sits in is an error); a link to nothing is an unreadable file.
        """
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
        photos, skipped = [], []
        for path in _photo_files(folder):
            rel = path.relative_to(folder)
            try:
                if not path.exists():
                    raise ImageLoadError(f"{path} is a link to {os.readlink(path)}, which does not exist")
                load_rgb(path)
            except ImageLoadError as e:
                if not skip_bad:
                    raise ImageLoadError(f"{e} (pass skip_bad_images=True to skip unreadable files)") from e
                skipped.append(f"{rel}: {e}")
                continue
            label = rel.parts[0] if len(rel.parts) > 1 else path.stem
            photos.append(Photo(id=f"user/{rel.as_posix()}", path=path, source="user", label=label,
                                licence="user supplied", sha256=_sha256(path)))
        if not photos:
            raise ValueError(f"image folder {folder} holds no readable images"
                             + (f" ({len(skipped)} skipped)" if skipped else ""))
        out = cls(photos, name=str(folder))
        out.skipped = skipped
        return out

    @classmethod
    def from_spec(cls, images: str, skip_bad: bool = False, max_images: int | None = None,
                  seed: int = 0) -> "ImageSet":
        """Returns ``default`` or the folder at path ``images``, optionally a seeded subset of ``max_images``."""
        if not isinstance(images, str):
            raise TypeError(f"images must be 'default' or a folder path (string), got {images!r}")
        out = cls.default() if images == "default" else cls.from_folder(images, skip_bad=skip_bad)
        return out.subset(max_images, seed)

    def subset(self, max_images: int | None, seed: int = 0) -> "ImageSet":
        """Returns self keeping a seeded subset of ``max_images`` photos (None, or at least as many: all)."""
        if max_images is not None:
            if int(max_images) < 3:
                raise ValueError(f"max_images must be at least 3 (train, validation, test), got {max_images}")
            if max_images < len(self):
                keep = rng_for(seed, "subset").permutation(len(self))[:max_images]
                self.photos = [self.photos[i] for i in sorted(keep)]
        return self

    # -- splits and views --------------------------------------------------------------------------

    @property
    def groups(self) -> list[PhotoGroup]:
        """Returns the photos in the groups a split keeps together (see ``group_photos``), sorted by first id."""
        key = (tuple(p.id for p in self.photos), self.near_duplicate_bits)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, group_photos(self.photos, self.near_duplicate_bits))
        return self._groups[1]

    def split(self, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0) -> Split:
        """Returns a seeded split by group (``groups``): test, then validation out of the rest, then train.

        Groups are taken in a seeded order; each goes to test while it fits the test share of photos, then to
        validation while it fits that share, else to train (a part no group fits takes the smallest group of
        the part with the most groups). Without merged groups this is the plain split by photo.
        """
        for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 < v < 1:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        n = len(self.photos)
        if n < 3:
            raise ValueError(f"need at least 3 photos for train, validation and test, got {n}")
        groups = self.groups
        if len(groups) < 3:
            raise ValueError(f"need at least 3 groups of photos for train, validation and test, got {len(groups)} "
                             f"(near-duplicates and shots of one subject are one group)")
        n_test = min(n - 2, max(1, round(test_fraction * n)))
        n_val = min(n - n_test - 1, max(1, round(val_fraction * (n - n_test))))
        parts: dict[str, list[PhotoGroup]] = {"train": [], "val": [], "test": []}
        room = {"test": n_test, "val": n_val}
        for i in rng_for(seed, "split").permutation(len(groups)):
            g = groups[i]
            part = next((k for k in ("test", "val") if len(g.ids) <= room[k]), "train")
            parts[part].append(g)
            if part != "train":
                room[part] -= len(g.ids)
        for part in ("test", "val", "train"):
            if not parts[part]:  # no group fitted its share: the smallest group of the part with the most groups
                donor = max(parts, key=lambda k: len(parts[k]))
                g = min(parts[donor], key=lambda g: len(g.ids))
                parts[donor].remove(g)
                parts[part].append(g)
        by_id = {p.id: p for p in self.photos}
        pick = lambda part: sorted((by_id[i] for g in parts[part] for i in g.ids), key=lambda p: p.id)  # noqa: E731
        return Split(train=pick("train"), val=pick("val"), test=pick("test"))

    @staticmethod
    def view(view: View, size: int, interpolation: str = "bicubic", crop_pct: float = 1.0, seed: int = 0,
             crop_scale_min: float = 0.35) -> np.ndarray:
        """Returns the (size, size, 3) uint8 image of ``view``, read-only.

        The views made last in this process (``VIEW_MEMO_BYTES`` of them) are kept by (the photo's content, the
        view's settings): a run asks for the same view many times (each semantic edit checks its masks and partners on
        every photo), and decoding and resizing a photo costs milliseconds each time."""
        key = (view.photo.sha256, view.photo.id, view.index, size, interpolation, crop_pct,
               (seed, crop_scale_min) if view.index else None)
        kept = _VIEWS.get(key)
        if kept is not None:
            return kept
        image = load_rgb(view.photo.path)
        if min(image.shape[:2]) < SMALL_PHOTO_FRACTION * size and (view.photo.sha256, size) not in _SMALL_SEEN:
            _SMALL_SEEN.add((view.photo.sha256, size))
            _notice(f"photo {view.photo.path} is {image.shape[1]} x {image.shape[0]} px, under a quarter of the "
                    f"network's {size} px input: its view is mostly interpolation; give larger photos or leave it out")
        if view.index == 0:
            out = square_view(image, size, interpolation, crop_pct)
        else:
            crop_seed = derive_seed(seed, "view", view.photo.id, view.index)
            out = square_view(image, size, interpolation, random_crop=(crop_seed, round(crop_scale_min * 100), True))
        return _VIEWS.put(key, out, VIEW_MEMO_BYTES)  # read-only: shared by every caller of this view

    def describe(self) -> "list[dict]":
        """Returns one dict per photo: id, source, label, licence, width, height, bytes, subject, group (the
        first id of the photos a split keeps with it) and grouped_by (why; empty for a lone photo)."""
        group_of = {i: g for g in self.groups for i in g.ids}
        rows = []
        for p in self.photos:
            with _pil_limit(None), Image.open(p.path) as img:
                w, h = img.size
            g = group_of[p.id]
            rows.append({"id": p.id, "source": p.source, "label": p.label, "licence": p.licence,
                         "width": w, "height": h, "bytes": p.path.stat().st_size, "subject": p.subject,
                         "group": g.ids[0], "grouped_by": "; ".join(g.reasons)})
        return rows


# -- the default sources ------------------------------------------------------------------------------

def source_series(author: str, source: str) -> str:
    """Returns ``<author>/<source name>``: the file name (or a ``picture=`` title) of a source address, lower
    case, its extension and a trailing shot number of one or two digits after a letter dropped
    (``Windmill_Linda_1.jpg`` -> ``windmill_linda``, ``Plier01.jpg`` -> ``plier``; dates and photo ids stay)."""
    url = urlsplit(source.strip())
    query = parse_qs(url.query)
    name = query["picture"][0] if "picture" in query else unquote(url.path.rstrip("/").rpartition("/")[2])
    name = name.split(":", 1)[1] if name.lower().startswith("file:") else name
    name = re.sub(r"\.[A-Za-z]{3,4}$", "", name)
    name = re.sub(r"[\s\-]+", "_", name.lower()).strip("_")
    name = re.sub(r"(?<=[^\W\d_])_?\d{1,2}$", "", name)
    return f"{' '.join(author.lower().split())}/{name}" if name else ""


def gcompris_photos(root: Path = REPO_DATA / "gcompris") -> list[Photo]:
    """Returns the vendored GCompris photos listed in ``data/gcompris/manifest.csv``; a photo's subject is its
    ``source_series`` (one author's numbered shots of one thing share it)."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing; regenerate it with scripts/extract_gcompris.py")
    with manifest.open(newline="") as f:
        return [Photo(id=f"gcompris/{row['file']}", path=root / row["file"], source="gcompris",
                      label=row["label"], licence=row["licence"], sha256=row["sha256"],
                      subject=source_series(row.get("author") or "", row.get("source") or ""))
                for row in csv.DictReader(f)]


def foolbox_photos() -> list[Photo]:
    """Returns the 20 labelled ImageNet photos inside the installed foolbox wheel (read, never copied)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the foolbox wheel (pinned in requirements.txt) is not installed")
    folder = Path(spec.origin).parent / "data"
    return [Photo(id=f"foolbox/{p.name}", path=p, source="foolbox", label=f"imagenet_{p.stem.split('_')[-1]}",
                  licence="ImageNet terms (research use)", sha256=_sha256(p))
            for p in sorted(folder.glob("imagenet_*.jpg"))]


_BUNDLED = [
    ("skimage", "data/astronaut.png", "astronaut", "public domain (NASA)"),
    ("skimage", "data/chelsea.png", "cat", "CC0 (Stefan van der Walt)"),
    ("skimage", "data/coffee.png", "coffee", "CC0 (Rachel Michetti)"),
    ("skimage", "data/rocket.jpg", "rocket", "public domain (SpaceX)"),
    ("skimage", "data/motorcycle_left.png", "motorcycle", "Middlebury 2014 stereo data (bundled with scikit-image)"),
    ("sklearn", "datasets/images/china.jpg", "temple", "CC-BY 2.0 (danielbuechele)"),
    ("sklearn", "datasets/images/flower.jpg", "flower", "CC-BY 2.0 (vultilion)"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "person", "public domain (US Navy)"),
]


def bundled_photos() -> list[Photo]:
    """Returns the photos shipped with scikit-image, scikit-learn and matplotlib."""
    import importlib

    photos = []
    for package, rel, label, licence in _BUNDLED:
        path = Path(importlib.import_module(package).__file__).parent / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {package}")
        photos.append(Photo(id=f"{package}/{path.name}", path=path, source=package, label=label,
                            licence=licence, sha256=_sha256(path)))
    return photos


def to_uint8_images(images: np.ndarray | torch.Tensor, size: int | None = None) -> np.ndarray:
    """Returns uint8 (B, H, W, 3) images from uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1], resized to size.

    Resizing is bilinear, antialiased when shrinking; float values are clamped to [0, 1] and rounded.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.detach().cpu().float()
    else:
        arr = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1], got "
                             f"{arr.dtype} of shape {arr.shape}")
        if size is None or arr.shape[1:3] == (size, size):
            return arr
        x = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).float().div_(255)  # a copy: arr may be read-only
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < min(x.shape[-2:]))
    return (x.clamp(0, 1).mul(255).round().to(torch.uint8)).permute(0, 2, 3, 1).contiguous().numpy()
