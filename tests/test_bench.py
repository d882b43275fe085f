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
    """RunConfig.threads is the number of torch and OpenCV threads while the chapter extracts and fits (None: the
    counts the process already had, their defaults unless someone changed them)."""
    import cv2

    from featmap.features.store import FeatureStore
    from featmap.maps.closed_form import Linear
    from featmap.run.chapter import run_chapter
    from featmap.run.config import RunConfig

    seen = {"extract": [], "fit": []}
    ensure, fit = FeatureStore.ensure, Linear.fit

    def counting_ensure(self, views, manipulations):
        seen["extract"].append(torch.get_num_threads())
        seen.setdefault("opencv", []).append(cv2.getNumThreads())
        return ensure(self, views, manipulations)

    def counting_fit(self, data):
        seen["fit"].append(torch.get_num_threads())
        return fit(self, data)

    monkeypatch.setattr(FeatureStore, "ensure", counting_ensure)
    monkeypatch.setattr(Linear, "fit", counting_fit)
    start = 2 if threads == 1 else 1  # the run has to change it to pass
    torch.set_num_threads(start)
    opencv_before = cv2.getNumThreads()
    cv2.setNumThreads(start)
    run_chapter(RunConfig(chapter="threads", manipulations=["grayscale"], layers=["blocks.6"], images=str(photo_dir),
                          image_size=64, train_views=1, mappings=["identity", "linear"], image_layers="none",
                          bootstrap=0, threads=threads), write=False)
    cv2.setNumThreads(opencv_before)
    expected = threads or start
    assert seen["extract"] and seen["fit"], seen
    assert set(seen["extract"]) == set(seen["fit"]) == set(seen["opencv"]) == {expected}, seen


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
           "disk.ours_bytes_per_image", "linear_map.linear.fit_seconds", "linear_map.linear.best_val_loss",
           "linear_map.linear_sgd_book.fit_seconds", "linear_map.linear_sgd_book.steps",
           "linear_map.linear_sgd_book.val_loss_above_closed_form", "linear_map.linear_sgd_reference.steps",
           "trained_map.fit_seconds", "trained_map.steps", "trained_map.seconds_per_step",
           "trained_map.test_cos_mean", "parameters.images",
           "parameters.book_images"]


def _get(data: dict, path: str):
    for part in path.split("."):
        data = data[part]
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# The smallest book that still runs every phase: image space, a trained map, two chapter kinds.
TINY_BOOK = {"max_steps": 10, "eval_every": 5, "patience": 10, "plateau_steps": 5, "bootstrap": 20,
             "image_size": 128, "image_photos": 2, "inverter_size": 32,
             "inverter_epochs": 1, "inverter_manipulations": ["grayscale"], "layers": ["blocks.6"],
             "mappings": ["identity", "linear", "mlp"], "image_mappings": ["identity", "linear"],
             "chapters": {"geometric": {"manipulations": ["mirror_h"]},
                          "layers": {"layers": ["blocks.4", "blocks.6"], "manipulations": ["grayscale"],
                                     "ranks": [1, 4]}}}


def test_the_bench_writes_every_figure(photo_dir, tmp_path, restore_threads):
    bench = _bench()
    out = tmp_path / "results.json"
    returned = bench.main(["--images", "8", "--layers", "blocks.6", "--fit-layer", "blocks.6", "--trained-steps",
                           "30", "--book-images", "6", "--book-chapters", "geometric,layers", "--book-in-process",
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


def _tiny_notebook(path: Path, source: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("label = 'default'", metadata={"tags": ["parameters", "hide-input"]}),
                nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


# What each tiny chapter records: its label (a parameter), its torch threads, when it ran and what it saw
RECORD = """
import json, os, time, torch
from pathlib import Path
out = Path(os.environ["TINY_BOOK_OUT"])
start, seen = time.time(), sorted(p.stem for p in out.glob("*.json"))
time.sleep(0.5)
(out / (os.environ["FEATMAP_BOOK_CHAPTER"] + ".json")).write_text(json.dumps(
    {"label": label, "threads": torch.get_num_threads(), "start": start, "end": time.time(), "seen": seen}))
"""


def test_the_book_runner_runs_chapters_side_by_side_with_its_thread_policy(tmp_path):
    """``run_book`` runs independent chapters two at once, each in its own papermill process with cores // jobs torch
    threads, then the summary and the intro side by side after them, with the parameters given; it writes every
    finished chapter's seconds and the wall time, also when one fails; a failing chapter stops the run with its
    error, or is recorded (keep_going)."""
    import os

    from featmap.run.book import main, run_book

    book, out = tmp_path / "book", tmp_path / "out"
    book.mkdir()
    out.mkdir()
    for name in ("data", "geometric", "summary", "intro"):
        _tiny_notebook(book / f"{name}.ipynb", RECORD)
    _tiny_notebook(book / "broken.ipynb", "raise ValueError('a failing chapter')")
    env, timings = {"TINY_BOOK_OUT": str(out)}, tmp_path / "timings.json"
    run = run_book(["summary", "data", "intro", "geometric"], book, tmp_path / "stage", timings, jobs=2,
                   parameters={"geometric": {"label": "given"}}, env=env)
    seen = {name: json.loads((out / f"{name}.json").read_text()) for name in ("data", "geometric", "summary", "intro")}
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {name: r["threads"] for name, r in seen.items()} == dict.fromkeys(seen, threads)
    assert seen["geometric"]["label"] == "given" and seen["data"]["label"] == "default"
    # the readers ran after both others, side by side
    assert {"data", "geometric"} <= set(seen["summary"]["seen"]) & set(seen["intro"]["seen"])
    assert seen["intro"]["start"] < seen["summary"]["end"] and seen["summary"]["start"] < seen["intro"]["end"]
    written = json.loads(timings.read_text())
    assert set(written["chapters"]) == {"data", "geometric", "summary", "intro"} and written["complete"]
    assert written["jobs"] == 2 and written["threads_per_chapter"] == threads and _is_number(written["wall_seconds"])
    assert run.wall < sum(run.seconds.values())  # the two chapters overlapped
    executed = json.loads((tmp_path / "stage" / "book" / "geometric.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "hide-input" in injected[0]["metadata"]["tags"]  # folded as the chapter's own parameters

    for name in seen:
        (out / f"{name}.json").unlink()
    with pytest.raises(RuntimeError, match="a failing chapter"):
        run_book(["broken", "summary"], book, tmp_path / "stage", timings, jobs=1, env=env)
    written = json.loads(timings.read_text())
    assert written["failed"] == "broken" and not written["complete"] and not (out / "summary.json").exists()
    run = run_book(["broken", "summary"], book, tmp_path / "stage", jobs=1, env=env, keep_going=True)
    assert "a failing chapter" in run.failed["broken"] and list(run.seconds) == ["summary"]
    assert main([str(tmp_path / "stage"), "--json"]) == 2
    assert main([str(tmp_path / "stage"), "data", "--jobs", "0"]) == 2


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
