"""The thread policy of a chapter run, the figures ``make bench`` writes, and the book runner's timings file.

Nothing here asserts a speed: the bench's values are measurements; these tests check that each one is written.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, None])  # not 2: two threads on a busy 2-core machine run many times slower
def test_a_chapter_runs_with_the_configured_number_of_threads(photo_dir, monkeypatch, restore_threads, threads):
    """RunConfig.threads is the number of torch threads while the chapter extracts and fits (None: the count the
    process already had, torch's default unless someone changed it)."""
    from featmap.features.store import FeatureStore
    from featmap.maps.closed_form import Linear
    from featmap.run.chapter import run_chapter
    from featmap.run.config import RunConfig

    seen = {"extract": [], "fit": []}
    ensure, fit = FeatureStore.ensure, Linear.fit

    def counting_ensure(self, views, manipulations):
        seen["extract"].append(torch.get_num_threads())
        return ensure(self, views, manipulations)

    def counting_fit(self, data):
        seen["fit"].append(torch.get_num_threads())
        return fit(self, data)

    monkeypatch.setattr(FeatureStore, "ensure", counting_ensure)
    monkeypatch.setattr(Linear, "fit", counting_fit)
    start = 2 if threads == 1 else 1  # the run has to change it to pass
    torch.set_num_threads(start)
    run_chapter(RunConfig(chapter="threads", manipulations=["grayscale"], layers=["blocks.6"], images=str(photo_dir),
                          image_size=64, train_views=1, mappings=["identity", "linear"], image_layers="none",
                          bootstrap=0, threads=threads), write=False)
    expected = threads or start
    assert seen["extract"] and seen["fit"], seen
    assert set(seen["extract"]) == set(seen["fit"]) == {expected}, seen


def _bench():
    spec = importlib.util.spec_from_file_location("featmap_bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every chapter figure the bench reports (dotted paths under book.chapters.<chapter> and book.total).
CHAPTER_FIGURES = ["cold_seconds", "warm_seconds", "peak_rss_mib_cold", "extraction.images_per_s",
                   "extraction.forward_images_per_s", "extraction.rate_fraction_of_forward",
                   "extraction.forwards_per_image", "warm_rerun.extracted", "warm_rerun.scores_computed",
                   "warm_rerun.trained"] + [f"shares.{p}" for p in ("prepare", "extraction", "fits", "training",
                                                                    "inverter", "image_scoring", "semantic_scoring",
                                                                    "other")]
FIGURES = ["seconds", "extraction.bare_forward_images_per_s", "extraction.cache_cold_images_per_s",
           "extraction.rate_fraction_of_bare_forward", "extraction.forwards_per_image",
           "disk.ours_bytes_per_image", "linear_map.linear.fit_seconds", "linear_map.linear_sgd.fit_seconds",
           "linear_map.linear_sgd.epochs", "trained_map.fit_seconds", "trained_map.epochs",
           "trained_map.seconds_per_epoch", "trained_map.test_cos_mean", "parameters.images",
           "parameters.book_images"]


def _get(data: dict, path: str):
    for part in path.split("."):
        data = data[part]
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# The smallest book that still runs every phase: image space, a trained map, two chapter kinds.
TINY_BOOK = {"max_epochs": 1, "bootstrap": 20, "image_size": 128, "image_photos": 2, "inverter_size": 32,
             "inverter_epochs": 1, "inverter_manipulations": ["grayscale"], "layers": ["blocks.6"],
             "mappings": ["identity", "linear", "mlp"], "image_mappings": ["identity", "linear"],
             "chapters": {"geometric": {"manipulations": ["mirror_h"]},
                          "layers": {"layers": ["blocks.4", "blocks.6"], "manipulations": ["grayscale"],
                                     "ranks": [1, 4]}}}


def test_the_bench_writes_every_figure(photo_dir, tmp_path, restore_threads):
    bench = _bench()
    out = tmp_path / "results.json"
    returned = bench.main(["--images", "8", "--layers", "blocks.6", "--fit-layer", "blocks.6", "--trained-epochs",
                           "2", "--book-images", "6", "--book-chapters", "geometric,layers", "--book-in-process",
                           "--book-params", json.dumps(TINY_BOOK), "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    missing = [p for p in FIGURES if not _is_number(_get(results, p))]
    for chapter in ("geometric", "layers", "total"):
        figures = results["book"]["total"] if chapter == "total" else results["book"]["chapters"][chapter]
        missing += [f"{chapter}: {p}" for p in CHAPTER_FIGURES if not _is_number(_get(figures, p))]
    assert not missing, f"not written, or not a number: {missing}"
    assert results["trained_map"]["map_size"] == "reference"
    for chapter in ("geometric", "layers"):  # the sizes are stated
        assert results["book"]["parameters"][chapter]["max_images"] == 6
    assert results["book"]["failed"] == {}
    assert "skipped" in results["cuda"] if not torch.cuda.is_available() else _is_number(
        results["cuda"]["bf16_autocast_images_per_s"])
    warm = results["book"]["total"]["warm_rerun"]
    assert warm["extracted"] == warm["scores_computed"] == warm["trained"] == 0  # the cache, not a speed
    assert results["book"]["total"]["threads_seen"] == [1]  # the bench's thread policy reached the chapters


def test_the_book_runner_writes_its_timings(tmp_path, monkeypatch):
    """``python -m featmap book STAGE CHAPTER ... --json PATH`` writes the seconds of every chapter that ran, also
    when one fails (papermill replaced by a stand-in that writes an empty notebook: nothing runs here)."""
    import nbformat
    import papermill

    from featmap.run.book import main

    ran = []

    def execute_notebook(source, target, **kwargs):
        ran.append(Path(source).stem)
        if Path(source).stem == "broken":
            raise RuntimeError("a failing chapter")
        nbformat.write(nbformat.v4.new_notebook(), target)

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    timings = tmp_path / "timings.json"
    assert main([str(tmp_path / "stage"), "data", "geometric", "--json", str(timings)]) == 0
    written = json.loads(timings.read_text())
    assert list(written["chapters"]) == ["data", "geometric"] and written["complete"] and written["failed"] is None
    assert all(_is_number(s) for s in written["chapters"].values()) and _is_number(written["total_seconds"])
    with pytest.raises(RuntimeError, match="a failing chapter"):
        main([str(tmp_path / "stage"), "data", "broken", "summary", "--json", str(timings)])
    written = json.loads(timings.read_text())
    assert list(written["chapters"]) == ["data"] and written["failed"] == "broken" and not written["complete"]
    assert ran == ["data", "geometric", "data", "broken"]  # a failing chapter stops the run
    assert main([str(tmp_path / "stage"), "--json"]) == 2


def test_the_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """bench/gpu-check.sh runs nothing where nvidia-smi finds no GPU (a stand-in that fails, first on PATH): it says
    so, writes it into gpu-figures.json and exits with status 2."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver'\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu-check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "finds no GPU" in proc.stdout and "nothing was run" in proc.stdout
    assert "finds no GPU" in json.loads((out / "gpu-figures.json").read_text())["skipped"]
    assert "finds no GPU" in (out / "log.txt").read_text()
