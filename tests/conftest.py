"""Shared fixtures: every test writes its cache and results under a temporary folder, offline."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than retry a hub that is not there


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEATMAP_RESULTS", str(tmp_path / "results"))


@pytest.fixture(scope="session")
def foolbox_dir() -> Path:
    from featmap.data.images import foolbox_photos

    return foolbox_photos()[0].path.parent


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, foolbox_dir) -> Path:
    """A flat folder of 8 real labelled photos (copied from the foolbox wheel)."""
    out = tmp_path_factory.mktemp("photos")
    for p in sorted(foolbox_dir.glob("imagenet_*.jpg"))[:8]:
        shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="session")
def lite0():
    from featmap.features.backbone import Backbone

    return Backbone("tf_efficientnet_lite0", ["blocks.4", "blocks.6"])


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two threads make small batches many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
