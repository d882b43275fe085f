"""Bring your own edits: a CSV manifest of (original, edited) image pairs made anywhere.

Columns: ``original,edited,edit`` and optionally ``prompt,seed``; one row per pair, paths relative to the
manifest's folder (and inside it). The originals become an ``ImageSet``; each edit name becomes a
``ManifestEdit`` that serves the user's edited image through the same view (crop, flip, size) as its
original: the edited file is resized to the original's pixel size here, the one place sizes are
reconciled, and then goes through the caller's ``image_of`` exactly as the original does.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featmap.core.io import cached, content_key
from featmap.data.images import ImageSet, Photo, View, load_rgb
from featmap.edits.segmentation import save_png
from featmap.edits.semantic import SemanticEdit, SkippedItem, load_png

REQUIRED = ("original", "edited", "edit")
OPTIONAL = ("prompt", "seed")


@dataclass(frozen=True)
class EditPair:
    """One manifest row: the original and edited files (resolved), the edit's name, its prompt and seed."""

    photo_id: str
    original: Path
    edited: Path
    edit: str
    prompt: str = ""
    seed: int | None = None


def _inside(manifest: Path, root: Path, line: int, column: str, value: str) -> Path:
    if not value:
        raise ValueError(f"{manifest} line {line}: column {column!r} is empty; give a path relative to {root}")
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{manifest} line {line}: {column} {value!r} resolves to {path}, outside the manifest's "
                         f"folder {root}; put the images in that folder (or below it) and give relative paths")
    if not path.is_file():
        raise FileNotFoundError(f"{manifest} line {line}: {column} file {value!r} not found (looked for {path})")
    return path


def read_manifest(path: str | Path) -> list[EditPair]:
    """Returns the pairs of the CSV manifest at ``path``; bad headers, rows, escaping or missing paths raise."""
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise FileNotFoundError(f"edit manifest {manifest} does not exist")
    root = manifest.parent.resolve()
    pairs, seen = [], set()
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in header]
        extra = [c for c in header if c not in REQUIRED + OPTIONAL]
        if missing or extra:
            raise ValueError(f"edit manifest {manifest} has the header {header}; expected the columns "
                             f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}"
                             + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            original = _inside(manifest, root, line, "original", row["original"])
            edited = _inside(manifest, root, line, "edited", row["edited"])
            name = row["edit"]
            if not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"{manifest} line {line}: edit name {name!r} must be letters, digits, '_', '.' or '-'")
            seed = row.get("seed", "")
            if seed and not re.fullmatch(r"-?\d+", seed):
                raise ValueError(f"{manifest} line {line}: seed {seed!r} is not an integer")
            photo_id = f"manifest/{original.relative_to(root).as_posix()}"
            if (photo_id, name) in seen:
                raise ValueError(f"{manifest} line {line}: {row['original']!r} has a second {name!r} edit")
            seen.add((photo_id, name))
            pairs.append(EditPair(photo_id, original, edited, name, row.get("prompt", ""), int(seed) if seed else None))
    if not pairs:
        raise ValueError(f"edit manifest {manifest} holds no pairs")
    return pairs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_images(pairs: list[EditPair], name: str = "manifest") -> ImageSet:
    """Returns the originals of ``pairs`` as an ImageSet (ids ``manifest/<path relative to the manifest>``)."""
    photos = {}
    for p in pairs:
        if p.photo_id not in photos:
            rel = Path(p.photo_id.removeprefix("manifest/"))
            photos[p.photo_id] = Photo(id=p.photo_id, path=p.original, source="manifest",
                                       label=rel.parts[0] if len(rel.parts) > 1 else rel.stem,
                                       licence="user supplied", sha256=_sha256(p.original))
    return ImageSet(list(photos.values()), name=name)


class ManifestEdit(SemanticEdit):
    """The user's edited images of one edit name, served through the same view as their originals."""

    cache_edits = False  # the reconciled files under edits/reconciled are the cache
    made_by = "made elsewhere (edit manifest)"

    def __init__(self, name: str, pairs: list[EditPair], cache_root: str | Path | None = None):
        self.pairs = {p.photo_id: p for p in pairs if p.edit == name}
        if not self.pairs:
            raise ValueError(f"no manifest rows for edit {name!r}; edits present: {sorted({p.edit for p in pairs})}")
        self.sha256 = {pid: _sha256(p.edited) for pid, p in self.pairs.items()}
        files = sorted((pid, self.sha256[pid], p.prompt, p.seed) for pid, p in self.pairs.items())
        super().__init__(name, {"manifest_edit": name, "pairs": content_key(files)}, cache_root=cache_root)
        self._sizes: dict[str, tuple[int, int]] = {}

    def _check(self, item: str, image: np.ndarray | None, seed: int = 0) -> None:
        if item.rpartition("#")[0] not in self.pairs:
            self.skipped[item] = f"{self.name}: the manifest has no edited image of this photo"
            self.skipped_kinds[item] = "not in the manifest"
            raise SkippedItem(self.skipped[item], "not in the manifest")

    def reconciled(self, photo_id: str) -> Path:
        """Returns a PNG of the edited image at its original's pixel size (made once, content-addressed)."""
        pair = self.pairs[photo_id]
        if photo_id not in self._sizes:  # the size after EXIF orientation, as the original's view sees it
            self._sizes[photo_id] = load_rgb(pair.original).shape[1::-1]
        size = self._sizes[photo_id]  # (width, height)
        key = content_key({"edited": self.sha256[photo_id], "size": list(size)})
        path = self.root / "edits" / "reconciled" / key[:2] / f"{key}.png"

        def make() -> np.ndarray:
            edited = load_rgb(pair.edited)
            if edited.shape[:2] != (size[1], size[0]):
                edited = np.asarray(Image.fromarray(edited).resize(size, Image.Resampling.BICUBIC))
            return edited

        cached(path, lambda p: load_png(p, (size[1], size[0], 3)), make, save_png)
        return path

    def edit(self, image: np.ndarray, seed: int, item: str) -> np.ndarray:
        _, image_of = self._bound()
        photo_id, _, index = item.rpartition("#")
        path = self.reconciled(photo_id)
        out = image_of(View(Photo(id=photo_id, path=path, source="manifest", label="", licence="user supplied",
                                  sha256=self.sha256[photo_id]), int(index)))
        if out.shape != image.shape:
            raise ValueError(f"{self.name}: image_of gave {out.shape} for the edit of {item} but the original view is "
                             f"{image.shape}; image_of must build the view from view.photo.path")
        return out


def manifest_edits(pairs: list[EditPair]) -> dict[str, ManifestEdit]:
    """Returns one ManifestEdit per edit name in ``pairs``, by name."""
    return {name: ManifestEdit(name, pairs) for name in sorted({p.edit for p in pairs})}
