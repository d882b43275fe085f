"""Feature extraction through the cache: (view, manipulation, layer) -> float16 feature map."""
from __future__ import annotations

import os
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featmap.core.io import content_key, default_cache_dir, entry_lock, read_cached, write_cached
from featmap.core.memo import ArrayMemo
from featmap.core.progress import bar as progress_bar
from featmap.data.images import ImageSet, View
from featmap.edits.manipulations import Manipulation
from featmap.features.backbone import Backbone

# Arrays read last in this process, at most this many bytes (Lite0 at blocks.2/4/6: 135 KiB per image), kept by (path,
# inode, size, modification time): a chapter reads each file about five times (every map of a cell, every cell of an
# edit, the originals for every edit), and np.load costs 0.15 ms a file. A file replaced or rewritten is read again.
FEATURE_MEMO_BYTES = 128 << 20
_READ = ArrayMemo()


class FeatureCache:
    """Float16 arrays on disk under their content key; unreadable or misshapen entries are misses."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.hits = self.misses = self.writes = self.rejected = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Returns the stored float16 array (read-only), or None when absent, unreadable or not of ``shape``."""
        path = self.path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.misses += 1
            return None
        seen = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        arr = _READ.get(seen)
        if arr is not None and (shape is None or arr.shape == tuple(shape)):
            self.hits += 1
            return arr
        arr = read_cached(path, lambda p: _load_features(p, shape))
        if arr is None:  # torn, foreign or of another shape: deleted by read_cached, recomputed by the caller
            self.rejected += 1
            self.misses += 1
            return None
        _READ.put(seen, arr, FEATURE_MEMO_BYTES)  # read-only: shared by every later reader
        self.hits += 1
        return arr

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, array: np.ndarray) -> None:
        """Stores ``array`` as float16 under ``key``, atomically."""
        self.put_many([key], np.asarray(array)[None])

    def put_many(self, keys: list[str], arrays: np.ndarray | torch.Tensor) -> None:
        """Stores ``arrays[i]`` as float16 under ``keys[i]``, each atomically; refuses the whole batch, naming the
        first bad key, before writing any when one holds a non-finite value or one beyond the float16 range.

        The check and the conversion run once per batch, in torch: numpy's float32 -> float16 conversion took 12x
        as long as torch's (the same rounding, tested), on a (32, 320, 7, 7) batch 1.3 ms against 0.11 ms."""
        t = torch.as_tensor(arrays).detach().cpu()
        if len(keys) != len(t):
            raise ValueError(f"put_many got {len(keys)} keys for {len(t)} arrays")
        flat = t.reshape(len(t), -1)
        bad = torch.zeros(len(t), dtype=torch.bool)
        if flat.shape[1]:  # NaN fails both comparisons; an infinity the second
            bad = ~(flat.abs() <= float(np.finfo(np.float16).max)).all(1)
        if bad.any():
            key = keys[int(bad.nonzero()[0, 0])]
            raise ValueError(f"refusing to cache features under {key}: non-finite or beyond the float16 range")
        halves = t.to(torch.float16).contiguous().numpy()
        for key, arr in zip(keys, halves):
            write_cached(self.path(key), lambda f, value: np.save(f, value, allow_pickle=False), arr)
            self.writes += 1


def _load_features(path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.float16 or (shape is not None and arr.shape != tuple(shape)):
        raise ValueError(f"{path} holds {arr.dtype} {arr.shape}, not float16 {shape}")
    return arr


@dataclass
class FeatureStore:
    """Extracts feature maps of manipulated views once, and serves them from the cache after that."""

    backbone: Backbone
    cache: FeatureCache
    seed: int = 0
    batch_size: int = 32
    crop_scale_min: float = 0.35
    progress: bool = True

    def key(self, view: View, manipulation: Manipulation | None, layer: str) -> str:
        """Returns the content key of one feature map (backbone, weights, preprocessing, image, edit, layer)."""
        pre = self.backbone.preprocessing
        view_id = {"sha256": view.photo.sha256, "index": view.index, "size": pre.size,
                   "interpolation": pre.interpolation, "crop_pct": pre.crop_pct}
        if view.index:
            view_id.update(seed=self.seed, crop_scale_min=self.crop_scale_min, photo=view.photo.id)
        return content_key({**self.backbone.identity(), "layer": layer, "view": view_id,
                            "manipulation": manipulation.cache_key(self.seed) if manipulation else None})

    def image(self, view: View, manipulation: Manipulation | None) -> np.ndarray:
        """Returns the (S, S, 3) uint8 image the backbone sees for ``view`` under ``manipulation``."""
        pre = self.backbone.preprocessing
        img = ImageSet.view(view, pre.size, pre.interpolation, pre.crop_pct, self.seed, self.crop_scale_min)
        return manipulation(img, self.seed, view.key) if manipulation else img

    def ensure(self, views: list[View], manipulations: list[Manipulation | None]) -> int:
        """Extracts every missing (view, manipulation) for all layers; returns how many images this call sent
        through the backbone.

        Processes extracting at once (two chapters, two identical runs) extract each image once: a view's missing
        images are taken under a lock on (backbone, view), looked up again once it is held (another process may have
        written them meanwhile), and the lock is let go once they are written. Views another process holds are
        passed over and come back at the end, so neither waits while there is other work. Batches still gather
        many views' images: a lock per view, not per pass, because two runs' lists of missing images differ by
        whatever each found written when it started, so their passes would not line up.

        Every forward pass holds exactly ``batch_size`` images: a last, smaller batch is filled with copies of its
        last image, whose outputs are dropped. The backbone's numbers for an image can depend on how many images
        share its pass (Lite0 on one CPU thread: a pass of 1 to 15 images differs from one of 16 to 32 in the last
        bits, which float16 keeps); with full passes a feature does not depend on which call, or which company in
        its pass, extracted it (tested). A call costs at most ``batch_size - 1`` extra images, and as many again
        each time it finds every view left held by another process."""
        todo = [v for v in views if self._missing(v, manipulations)]
        if not todo:
            return 0
        bar = progress_bar(total=len(todo) * len(manipulations), desc=f"extracting {self.backbone.name}", unit="img",
                           disable=not self.progress)
        waiting, pending, held, done = deque(dict.fromkeys(todo)), [], {}, 0
        try:
            while waiting:
                sweep, passed_over = len(waiting), 0
                for _ in range(sweep):
                    view = waiting.popleft()
                    lock = self._lock(view, wait=False)
                    if lock is None:  # another process is extracting it: come back to it
                        waiting.append(view)
                        passed_over += 1
                        continue
                    missing = self._missing(view, manipulations)
                    bar.update(len(manipulations) - len(missing))
                    if not missing:
                        lock.close()
                        continue
                    held[view] = [lock, len(missing)]
                    pending += [(view, m) for m in missing]
                    while len(pending) >= self.batch_size:
                        done += self._extract(pending[:self.batch_size], held, bar)
                        pending = pending[self.batch_size:]
                if passed_over == sweep:  # every view left is held elsewhere
                    if pending:
                        done += self._extract(pending, held, bar)
                        pending = []
                    lock = self._lock(waiting[0], wait=True)  # holding nothing while it waits: no deadlock
                    lock.close()  # the other process has finished it: the loop looks again
            if pending:
                done += self._extract(pending, held, bar)
        finally:
            for lock, _ in held.values():
                lock.close()
            bar.close()
        return done

    def _missing(self, view: View, manipulations: list[Manipulation | None]) -> list[Manipulation | None]:
        layers = self.backbone.layers
        return [m for m in manipulations if not all(self.cache.contains(self.key(view, m, layer)) for layer in layers)]

    def _lock(self, view: View, wait: bool) -> ExitStack | None:
        """Returns the held lock on extracting ``view`` with this backbone and cache (close it to let go), or None
        when another process holds it and ``wait`` is False."""
        stack = ExitStack()
        if stack.enter_context(entry_lock(self.cache.path(self.key(view, None, "extracting")), wait)):
            return stack
        stack.close()
        return None

    def _extract(self, batch: list[tuple[View, Manipulation | None]], held: dict, bar) -> int:
        """Runs one forward pass of ``batch`` (filled to ``batch_size``), writes its features, lets go of the views
        it finished; returns the batch's length."""
        images, decoded = [], {}
        for view, manip in batch:
            if view not in decoded:  # a view's images sit together: decode each photo once
                decoded = {view: self.image(view, None)}
            images.append(manip(decoded[view], self.seed, view.key) if manip else decoded[view])
        images += images[-1:] * (self.batch_size - len(images))
        feats = self.backbone.features(np.stack(images))
        for layer, maps in feats.items():
            self.cache.put_many([self.key(view, manip, layer) for view, manip in batch], maps[:len(batch)])
        for view, _ in batch:
            held[view][1] -= 1
            if not held[view][1]:
                held.pop(view)[0].close()
        bar.update(len(batch))
        return len(batch)

    def load(self, views: list[View], manipulation: Manipulation | None, layer: str) -> torch.Tensor:
        """Returns the (N, C, H, W) float32 maps of ``views``, extracting whatever is missing."""
        shape = self.backbone.specs[layer].shape
        out = []
        for view in views:
            arr = self.cache.get(self.key(view, manipulation, layer), shape)
            if arr is None:
                self.ensure([view], [manipulation])
                arr = self.cache.get(self.key(view, manipulation, layer), shape)
            out.append(arr)
        return torch.from_numpy(np.stack(out)).float()  # torch's float16 -> float32: half numpy's time, exact
