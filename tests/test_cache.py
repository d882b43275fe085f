from pathlib import Path

import numpy as np
import pytest

import featmap
from featmap.core.io import cached, content_key, read_cached, write_cached
from featmap.data.images import ImageSet
from featmap.edits.manipulations import get_manipulation
from featmap.features.store import FeatureCache, FeatureStore


def test_round_trip_is_float16_and_identical(tmp_path):
    cache = FeatureCache(tmp_path)
    arr = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    cache.put("ab" * 32, arr)
    out = cache.get("ab" * 32, (4, 3, 3))
    assert out.dtype == np.float16 and np.array_equal(out, arr.astype(np.float16))
    assert cache.get("cd" * 32) is None


def test_crash_mid_write_leaves_nothing_to_trust(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = "ef" * 32

    def dies_half_way(f, arr, allow_pickle):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(np, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, np.ones((2, 2)))
    monkeypatch.undo()
    assert cache.get(key) is None
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.npy"))


def test_truncated_or_misshapen_entries_are_rejected_and_removed(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put("aa" * 32, np.ones((8, 4, 4)))
    path = cache.path("aa" * 32)
    path.write_bytes(path.read_bytes()[:100])  # a torn file under the final name
    assert cache.get("aa" * 32, (8, 4, 4)) is None and not path.exists() and cache.rejected == 1
    cache.put("bb" * 32, np.ones((8, 4, 4)))
    assert cache.get("bb" * 32, (8, 2, 2)) is None  # wrong shape for this layer: not trusted


def test_a_file_read_again_comes_from_memory_until_it_changes(tmp_path, monkeypatch):
    import featmap.features.store as store

    reads = []
    load = store._load_features
    monkeypatch.setattr(store, "_load_features", lambda p, shape: reads.append(p) or load(p, shape))
    cache = FeatureCache(tmp_path)
    cache.put("dd" * 32, np.ones((8, 4, 4)))
    first, again = cache.get("dd" * 32, (8, 4, 4)), cache.get("dd" * 32, (8, 4, 4))
    assert len(reads) == 1 and again is first and not first.flags.writeable and cache.hits == 2
    cache.put("dd" * 32, np.full((8, 4, 4), 2.0))  # rewritten (atomically: a new file under the name)
    assert np.all(cache.get("dd" * 32, (8, 4, 4)) == 2) and len(reads) == 2
    path = cache.path("dd" * 32)
    path.write_bytes(path.read_bytes()[:100])  # torn in place after it was read: read again, rejected
    assert cache.get("dd" * 32, (8, 4, 4)) is None and cache.rejected == 1
    monkeypatch.setattr(store, "FEATURE_MEMO_BYTES", 3 * 8 * 4 * 4 * 2)  # room for three arrays
    for i in range(5):
        cache.put(f"{i}e" * 32, np.full((8, 4, 4), i))
        cache.get(f"{i}e" * 32, (8, 4, 4))
    assert store._READ.nbytes <= store.FEATURE_MEMO_BYTES and len(store._READ) == 3
    cache.get("0e" * 32, (8, 4, 4))  # the oldest was let go: read from disk again
    assert reads[-1] == cache.path("0e" * 32)


def test_non_finite_features_are_refused(tmp_path):
    with pytest.raises(ValueError, match="float16 range"):
        FeatureCache(tmp_path).put("cc" * 32, np.array([1e6]))  # overflows float16


def test_a_batch_is_stored_as_numpy_rounds_it_and_refused_whole_naming_the_bad_key(tmp_path):
    cache = FeatureCache(tmp_path)
    rng = np.random.default_rng(1)
    tiny = np.finfo(np.float16).smallest_subnormal
    values = np.concatenate([rng.normal(size=206) * 10.0 ** rng.integers(-9, 4, size=206),  # normals, subnormals
                             [tiny / 2, tiny * 1.5, 65504.0, -65504.0, 0.0, -0.0]]).astype(np.float32)
    batch = values.reshape(2, 2, 53)
    cache.put_many(["a1" * 32, "a2" * 32], batch)
    for i, key in enumerate(["a1" * 32, "a2" * 32]):  # torch's conversion rounds as numpy's does, ties included
        assert np.array_equal(cache.get(key, (2, 53)), batch[i].astype(np.float16))
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="b2" * 32):
        cache.put_many(["b1" * 32, "b2" * 32, "b3" * 32], bad)
    bad[1, 2], bad[2, 0] = 1.0, -np.inf
    with pytest.raises(ValueError, match="b3" * 32):
        cache.put_many(["b1" * 32, "b2" * 32, "b3" * 32], bad)
    assert all(cache.get(k * 32) is None for k in ("b1", "b2", "b3"))  # nothing of a refused batch is written
    with pytest.raises(ValueError, match="2 keys for 3 arrays"):
        cache.put_many(["c1" * 32, "c2" * 32], np.ones((3, 2)))


def test_extraction_skips_what_another_process_wrote_meanwhile_and_gives_the_same_numbers(tmp_path, lite0,
                                                                                          photo_dir):
    """A backbone's numbers for an image can depend on how many images share its forward pass: every pass is full,
    so a call that skips the images a chapter beside it wrote meanwhile gives the numbers of a call alone."""
    views = ImageSet.from_folder(photo_dir).split(seed=0).views("train", 1)[:4]
    grey = get_manipulation("grayscale")
    store = FeatureStore(lite0, FeatureCache(tmp_path), seed=0, batch_size=3, progress=False)
    other = FeatureStore(lite0, FeatureCache(tmp_path), seed=0, batch_size=3, progress=False)
    forwards, features = [], lite0.features

    def counted(images, layers=None):
        forwards.append(len(images))
        if len(forwards) == 1:  # while the first batch runs, the other process extracts the last view
            other.ensure(views[3:], [None, grey])
        return features(images, layers)

    store.backbone = type("Counted", (), {"__getattr__": lambda self, n: getattr(lite0, n),
                                          "features": staticmethod(counted)})()
    assert store.ensure(views, [None, grey]) == 6 and forwards == [3, 3]  # the last view was the other's
    alone = FeatureStore(lite0, FeatureCache(tmp_path / "alone"), seed=0, batch_size=3, progress=False)
    alone.ensure(views, [None, grey])
    for m in (None, grey):  # the same numbers as a run with no other process
        assert np.array_equal(store.load(views, m, "blocks.6"), alone.load(views, m, "blocks.6"))


def test_a_feature_does_not_depend_on_which_call_extracted_it(tmp_path, lite0, photo_dir):
    """Calls of different lengths put an image in passes with different company: its numbers are the same."""
    views = ImageSet.from_folder(photo_dir).split(seed=0).views("train", 1)[:5]
    noise = get_manipulation("noise_40")
    sizes = {}

    def extracted(todo_views, name):
        store = FeatureStore(lite0, FeatureCache(tmp_path / name), seed=0, batch_size=3, progress=False)
        seen = []
        store.backbone = type("Counted", (), {"__getattr__": lambda self, n: getattr(lite0, n),
                                              "features": staticmethod(lambda im, layers=None: seen.append(len(im))
                                                                       or lite0.features(im, layers))})()
        store.ensure(todo_views, [None, noise])
        sizes[name] = seen
        return {layer: store.load(views[-1:], noise, layer) for layer in lite0.layers}

    assert len(views) == 5  # below: 2, 10 and 8 images in passes of 3
    alone = extracted(views[-1:], "alone")    # one pass: the view's two images and a copy
    among = extracted(views, "among")         # the view's images split between the third and the fourth pass
    shifted = extracted(views[1:], "shifted")  # both in the third pass, with one image of another view
    assert sizes == {"alone": [3], "among": [3, 3, 3, 3], "shifted": [3, 3, 3]}
    for layer in lite0.layers:
        assert np.array_equal(alone[layer], among[layer]) and np.array_equal(alone[layer], shifted[layer]), layer


def test_content_key_is_canonical():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_store_extracts_once_and_serves_identical_maps(tmp_path, lite0, photo_dir):
    images = ImageSet.from_folder(photo_dir)
    views = images.split(seed=0).views("train", 2)[:4]
    noise, grey = get_manipulation("noise_40"), get_manipulation("grayscale")
    store = FeatureStore(lite0, FeatureCache(tmp_path), seed=0, batch_size=3, progress=False)
    assert store.ensure(views, [None, noise, grey]) == 12
    assert store.ensure(views, [None, noise, grey]) == 0  # a second run extracts nothing
    cached = store.load(views, noise, "blocks.6")
    fresh = lite0.features(np.stack([store.image(v, noise) for v in views]))["blocks.6"]
    assert np.array_equal(cached.numpy(), fresh.numpy().astype(np.float16).astype(np.float32))
    # a torn entry is recomputed to the same numbers
    path = store.cache.path(store.key(views[0], noise, "blocks.6"))
    path.write_bytes(path.read_bytes()[:64])
    assert np.array_equal(store.load(views, noise, "blocks.6").numpy(), cached.numpy())


def test_keys_separate_what_changes_the_features(tmp_path, lite0, photo_dir):
    view = ImageSet.from_folder(photo_dir).split(seed=0).views("train", 2)[1]
    s0 = FeatureStore(lite0, FeatureCache(tmp_path), seed=0)
    s1 = FeatureStore(lite0, FeatureCache(tmp_path), seed=1)
    noise, grey = get_manipulation("noise_40"), get_manipulation("grayscale")
    keys = {s0.key(view, None, "blocks.6"), s0.key(view, None, "blocks.4"), s0.key(view, noise, "blocks.6"),
            s0.key(view, grey, "blocks.6"), s1.key(view, noise, "blocks.6")}
    assert len(keys) == 5
    test_view = ImageSet.from_folder(photo_dir).split(seed=0).views("test", 1)[0]
    assert s0.key(test_view, grey, "blocks.6") == s1.key(test_view, grey, "blocks.6")  # nothing random in it


def test_the_cache_helper_loads_discards_recomputes_and_writes_once(tmp_path):
    path, computed = tmp_path / "entry.txt", []

    def compute():
        computed.append(1)
        return "fresh"

    def load(p):
        text = p.read_text()
        if text != "fresh":
            raise ValueError(f"stale entry {text!r}")
        return text

    def save(f, value):
        f.write(value.encode())

    assert cached(path, load, compute, save) == "fresh" and path.read_text() == "fresh"
    assert cached(path, load, compute, save) == "fresh" and computed == [1]  # a hit computes nothing
    path.write_text("torn")
    assert read_cached(path, load) is None and not path.exists()  # an entry that does not load is deleted
    assert cached(path, load, compute, save) == "fresh" and computed == [1, 1]
    write_cached(path, save, "fresh")
    assert read_cached(path, load) == "fresh" and not list(tmp_path.glob("*.tmp"))


def test_every_cache_writes_through_the_one_atomic_helper():
    """No module but core/io.py opens its own temporary file or renames one over an entry."""
    package = Path(featmap.__file__).parent
    own = [str(p.relative_to(package)) for p in package.rglob("*.py") if p != package / "core" / "io.py"
           and any(code in p.read_text() for code in ("mkstemp(", "os.replace(", "os.rename("))]
    assert not own, f"atomic writes outside featmap.core.io: {own}"


_LOCKED_WRITER = """
import sys, time
from pathlib import Path
from featmap.core.io import cached
path, log = Path(sys.argv[1]), Path(sys.argv[2])
def compute():
    with log.open("a") as f:
        f.write("computed\\n")
    time.sleep(3)  # long enough that the other process asks while this one computes
    return b"value"
print(cached(path, lambda p: p.read_bytes(), compute, lambda f, v: f.write(v), lock=True).decode())
"""


def test_a_locked_entry_is_computed_once_by_processes_that_need_it_at_once(tmp_path):
    """Two processes (two chapters of a book run side by side) ask for the same missing entry with ``lock=True``:
    one computes it, the other waits and reads it; both get the value."""
    import subprocess
    import sys

    script, entry, log = tmp_path / "writer.py", tmp_path / "cache" / "entry.bin", tmp_path / "log.txt"
    script.write_text(_LOCKED_WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(entry), str(log)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outputs == ["value", "value"] and all(p.returncode == 0 for p in procs)
    assert log.read_text().splitlines() == ["computed"]
