"""Photos: the embedded default set, user folders, one RGB conversion boundary, views and splits.

Every image enters featmap through ``load_rgb`` (any mode, size or bit depth -> RGB uint8) and
``ImageSet.view`` (-> a square uint8 view at the configured size, the model's own crop and
interpolation). Splits are by source photo: all views of a photo stay on one side.
"""
from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import RandomResizedCrop

from featmap.core.seeding import derive_seed, rng_for

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class ImageLoadError(ValueError):
    """An image file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Photo:
    """One source photo: a stable id, where it came from, its label and licence, and its bytes' hash."""

    id: str
    path: Path
    source: str
    label: str
    licence: str
    sha256: str = field(compare=False)

    @property
    def imagenet_index(self) -> int | None:
        """Returns the ImageNet-1k class index where the label is one (``imagenet_<index>``), else None."""
        head, _, tail = self.label.rpartition("_")
        return int(tail) if head == "imagenet" and tail.isdigit() else None


def load_rgb(path: str | Path) -> np.ndarray:
    """Returns the image at ``path`` as (H, W, 3) uint8 RGB (EXIF orientation applied).

    Grey, palette, alpha (composited on white), 16-bit, 32-bit integer and float images are converted
    here and nowhere else.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except FileNotFoundError:
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
    pil = Image.fromarray(image)
    if random_crop is None:
        w, h = pil.size
        if max(w, h) > 4 * min(w, h):
            # A long strip: keep only its centre, or the resized intermediate grows with its length
            # (a 1 x 4000 banner would become 256 x 1,024,000 pixels before the crop).
            keep = 4 * min(w, h)
            box = ((w - keep) // 2, 0, (w + keep) // 2, h) if w > h else (0, (h - keep) // 2, w, (h + keep) // 2)
            pil = pil.crop(box)
            w, h = pil.size
        scale = size / crop_pct / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(pil.crop((left, top, left + size, top + size)))
    seed, scale_min, flip = random_crop
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(pil, scale=(scale_min / 100, 1.0), ratio=(3 / 4, 4 / 3))
        do_flip = bool(flip) and bool(torch.rand(1).item() < 0.5)
    pil = pil.crop((left, top, left + w, top + h)).resize((size, size), resample)
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


class ImageSet:
    """An ordered, de-duplicated list of photos, with views and seeded splits by source photo."""

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

        Every non-hidden file must be a readable image; ``skip_bad`` skips (and records) the others.
        """
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        photos, skipped = [], []
        for path in files:
            rel = path.relative_to(folder)
            try:
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

    def split(self, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0) -> Split:
        """Returns a seeded split by source photo: test, then validation out of the rest, then train."""
        for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 < v < 1:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        n = len(self.photos)
        if n < 3:
            raise ValueError(f"need at least 3 photos for train, validation and test, got {n}")
        order = rng_for(seed, "split").permutation(n)
        n_test = min(n - 2, max(1, round(test_fraction * n)))
        n_val = min(n - n_test - 1, max(1, round(val_fraction * (n - n_test))))
        pick = lambda idx: sorted((self.photos[i] for i in idx), key=lambda p: p.id)  # noqa: E731
        return Split(train=pick(order[n_test + n_val:]), val=pick(order[n_test:n_test + n_val]),
                     test=pick(order[:n_test]))

    @staticmethod
    def view(view: View, size: int, interpolation: str = "bicubic", crop_pct: float = 1.0, seed: int = 0,
             crop_scale_min: float = 0.35) -> np.ndarray:
        """Returns the (size, size, 3) uint8 image of ``view``."""
        image = load_rgb(view.photo.path)
        if view.index == 0:
            return square_view(image, size, interpolation, crop_pct)
        crop_seed = derive_seed(seed, "view", view.photo.id, view.index)
        return square_view(image, size, interpolation, random_crop=(crop_seed, round(crop_scale_min * 100), True))

    def describe(self) -> "list[dict]":
        """Returns one dict per photo: id, source, label, licence, width, height, bytes."""
        rows = []
        for p in self.photos:
            with Image.open(p.path) as img:
                w, h = img.size
            rows.append({"id": p.id, "source": p.source, "label": p.label, "licence": p.licence,
                         "width": w, "height": h, "bytes": p.path.stat().st_size})
        return rows


# -- the default sources ------------------------------------------------------------------------------

def gcompris_photos(root: Path = REPO_DATA / "gcompris") -> list[Photo]:
    """Returns the vendored GCompris photos listed in ``data/gcompris/manifest.csv``."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing; regenerate it with scripts/extract_gcompris.py")
    with manifest.open(newline="") as f:
        return [Photo(id=f"gcompris/{row['file']}", path=root / row["file"], source="gcompris",
                      label=row["label"], licence=row["licence"], sha256=row["sha256"])
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
