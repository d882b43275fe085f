"""Two processes extracting the same views at once (two chapters, or the same run twice) send each image through
the backbone once, and leave no lock files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

_EXTRACT = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from featmap.data.images import ImageSet, View
from featmap.edits.manipulations import get_manipulation
from featmap.features.backbone import Backbone
from featmap.features.store import FeatureCache, FeatureStore

photos, cache, out, me = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
backbone = Backbone("tf_efficientnet_lite0", ["blocks.6"], weights="random")
store = FeatureStore(backbone, FeatureCache(cache), batch_size=4, progress=False)
views = [View(p) for p in ImageSet.from_folder(photos).photos]
edits = [None, get_manipulation("grayscale"), get_manipulation("rotation_90")]
passes, written = [], []
forward, put_many = backbone.features, store.cache.put_many

def counted(images, layers=None):
    passes.append(len(images))
    time.sleep(0.3)  # a slow pass: the two processes overlap whatever the machine's speed
    return forward(images, layers)

def recorded(keys, arrays):
    written.extend(keys)
    put_many(keys, arrays)

backbone.features, store.cache.put_many = counted, recorded
(out / f"ready-{me}").touch()
while not (out / "go").exists():
    time.sleep(0.005)
n = store.ensure(views, edits)
(out / f"{me}.json").write_text(json.dumps({"returned": n, "passes": passes, "written": written}))
"""


def test_two_processes_extract_each_image_once(tmp_path, photo_dir, one_thread):
    script, cache, out, tmp = tmp_path / "extract.py", tmp_path / "cache", tmp_path / "out", tmp_path / "tmp"
    script.write_text(_EXTRACT)
    out.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}  # the lock folder lives under the temporary directory
    procs = [subprocess.Popen([sys.executable, str(script), str(photo_dir), str(cache), str(out), me], env=env)
             for me in ("a", "b")]
    deadline = time.time() + 120
    while not all((out / f"ready-{me}").exists() for me in ("a", "b")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a child failed to start"
        time.sleep(0.05)
    (out / "go").touch()  # both start extracting at once
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    a, b = (json.loads((out / f"{me}.json").read_text()) for me in ("a", "b"))
    images = len(list(photo_dir.iterdir())) * 3  # every photo under no edit, grayscale and rotation_90
    assert a["returned"] + b["returned"] == images  # alone, each would have extracted all of them
    assert a["returned"] and b["returned"]  # the work was shared, not serialised
    assert not set(a["written"]) & set(b["written"]) and len(set(a["written"]) | set(b["written"])) == images
    assert all(n == 4 for n in a["passes"] + b["passes"])  # full passes only
    assert len(a["passes"]) + len(b["passes"]) <= images // 4 + 3  # at most a few padded passes where they met
    assert not any(tmp.rglob("*.lock"))  # every lock file removed once let go

    from featmap.data.images import ImageSet, View
    from featmap.edits.manipulations import get_manipulation
    from featmap.features.backbone import Backbone
    from featmap.features.store import FeatureCache, FeatureStore

    backbone = Backbone("tf_efficientnet_lite0", ["blocks.6"], weights="random")
    views = [View(p) for p in ImageSet.from_folder(photo_dir).photos]
    shared = FeatureStore(backbone, FeatureCache(cache), batch_size=4, progress=False)
    alone = FeatureStore(backbone, FeatureCache(tmp_path / "alone"), batch_size=4, progress=False)
    edits = [None, get_manipulation("grayscale"), get_manipulation("rotation_90")]
    assert alone.ensure(views, edits) == images
    for edit in edits:  # the numbers of one process alone (one thread, as the children)
        assert np.array_equal(shared.load(views, edit, "blocks.6"), alone.load(views, edit, "blocks.6"))
    assert shared.ensure(views, [None]) == 0
