"""featmap benchmark: one run, the same features, side by side. Writes bench/results.json and prints a table.

  extraction            images/s through the cache layer (FeatureStore.ensure) vs the bare backbone forward on the
                        same decoded images, as a fraction of it (the floor is one forward per image); warm vs cold
  disk                  bytes per image in the cache vs the reference's float32 memmaps for the same layers
  linear map            closed form (streaming ridge) vs gradient descent (linear_sgd) with the book's and the
                        reference's training settings: steps, early stopping, seconds, validation loss against the
                        closed form's on the same objective
  trained map           one trained map (transformer) at map_size reference: seconds, steps, seconds per step
  book                  the book's chapters on a seeded photo subset, run twice on one cache (cold: an empty cache,
                        chapters in make book's order sharing it; warm: the same again), each in a fresh process:
                        seconds, peak memory, where the time went (extraction, closed-form fits, training, inverter,
                        image and semantic scoring, from RunResult.timings and the bench's probes), the extraction
                        rate as a fraction of the forward rate, and what the warm rerun recomputed (must be nothing)
  CUDA (when present)   images/s in float32 and bf16 and the achieved fraction of the device's bf16 matrix rate

Sizes are parameters (``python bench/run.py --help``; ``make bench BENCH_IMAGES=...``) and are written into the
results. Every number comes from featmap's own code paths (Backbone, FeatureStore, PairData, MAPPINGS, run_chapter,
run_layers, run_backbones). Values are measurements, not assertions: the bench fails only when a run fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from featmap.core.device import resolve_device
from featmap.core.io import REPO_ROOT, atomic_write
from featmap.maps.base import MAP_SIZES, MapOptions, get_mapping
from featmap.maps.data import PairData
from featmap.maps.learned import objective
from featmap.run.config import RunConfig
from featmap.run.prepare import prepare
from featmap.score.metrics import cos_mean
from featmap.train.loop import TrainConfig

OUT = REPO_ROOT / "bench" / "results.json"
# Dense bf16 tensor-core rates from the vendors' data sheets (no sparsity), for the devices we know.
BF16_SPEC_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}
SECTIONS = ("extraction", "disk", "linear_map", "trained_map", "book", "cuda")
# The chapters that compute (make book's order); data, summary and intro only read what these write.
BOOK_CHAPTERS = ("geometric", "masking", "semantic", "layers", "backbones")
# The small book: each chapter's own defaults (every map, image space, its inverter) on fewer edits. Every value is
# a chapter parameter (featmap.run.presets); BENCH_BOOK_PARAMS overrides them (YAML: name: value for every chapter
# that takes it; chapters: {chapter: {name: value}} for one).
SMALL_BOOK = {
    "geometric": {"manipulations": ["rotation_90", "grayscale"]},
    "masking": {"manipulations": ["mask_big_square_center"]},
    # GrabCut finds no object in some photos: 24 give every split part one (as the tests' small book)
    "semantic": {"manipulations": ["object_recolor", "object_paste"], "max_images": 24},
    "layers": {"manipulations": ["rotation_90", "mask_big_square_center"]},
    "backbones": {"manipulations": ["rotation_90", "grayscale"]},
}
# Where a chapter's time goes; the shares of a run's seconds sum to 1 ("other": loading, planning, tables).
PHASES = ("prepare", "extraction", "fits", "training", "inverter", "image_scoring", "semantic_scoring", "other")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=env("BENCH_SECTIONS", ",".join(SECTIONS)),
                   help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    p.add_argument("--images", type=int, default=int(env("BENCH_IMAGES", 60)),
                   help="photos (a seeded subset of the default set) for extraction, disk and the single maps")
    p.add_argument("--layers", default=env("BENCH_LAYERS", "blocks.2,blocks.4,blocks.6"),
                   help="comma-separated layers extracted (disk is summed over them)")
    p.add_argument("--fit-layer", default=env("BENCH_FIT_LAYER", "blocks.6"), help="layer of the single maps")
    p.add_argument("--manipulation", default=env("BENCH_MANIPULATION", "grayscale"))
    p.add_argument("--trained-map", default=env("BENCH_TRAINED_MAP", "transformer"),
                   help="the one trained map timed on its own")
    p.add_argument("--map-size", default=env("BENCH_MAP_SIZE", "reference"), choices=list(MAP_SIZES),
                   help="its size preset (reference: width 512, 4 layers, 8 heads, ffn 1024)")
    # The reference's cap (11900 steps) is hours for a reference-size transformer on a CPU core (about 1.3 s a step
    # here): the default measures the rate and states the cap; a GPU check passes the reference's.
    p.add_argument("--trained-steps", type=int, default=int(env("BENCH_TRAINED_STEPS", 100)),
                   help="its step cap, with the reference's early stopping (714 steps), and that of the linear map "
                        "trained with the reference's settings; the reference: 11900")
    p.add_argument("--book-images", type=int, default=int(env("BENCH_BOOK_IMAGES", 12)),
                   help="photos of the small book's chapters (a seeded subset; semantic takes 24 unless overridden)")
    p.add_argument("--book-chapters", default=env("BENCH_BOOK_CHAPTERS", ",".join(BOOK_CHAPTERS)),
                   help="comma-separated chapters of the small book, run in this order")
    p.add_argument("--book-params", default=env("BENCH_BOOK_PARAMS", ""),
                   help="YAML overrides of the small book: name: value for every chapter that takes it, and "
                        "chapters: {chapter: {name: value}} for one, e.g. "
                        "'{max_steps: 30, chapters: {geometric: {manipulations: [mirror_h]}}}'")
    p.add_argument("--book-in-process", action="store_true", default=env("BENCH_BOOK_IN_PROCESS", "") == "1",
                   help="run the chapters in this process (the tests; peak memory is then this process's)")
    p.add_argument("--batch-size", type=int, default=int(env("BENCH_BATCH", 32)))
    # One thread by default: on a shared 2-core machine torch's default of 2 ran the SGD fit 11x slower.
    p.add_argument("--threads", type=int, default=int(env("BENCH_THREADS", 1)),
                   help="torch CPU threads, the chapters' threads parameter too (0: torch's default)")
    p.add_argument("--device", default=env("BENCH_DEVICE", "auto"))
    p.add_argument("--cuda-batch", type=int, default=int(env("BENCH_CUDA_BATCH", 128)))
    p.add_argument("--out", type=Path, default=Path(env("BENCH_OUT", OUT)))
    p.add_argument("--book-child", help=argparse.SUPPRESS)  # internal: one chapter run in a fresh process
    return p


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------------
# Probes: what a run spends where, by wrapping the package's own entry points (this process only, undone after)

class Probe:
    """Within ``with Probe() as p``: seconds and counts of extraction (FeatureStore.ensure) and of the backbone
    forwards inside it, of every map fit (trained maps apart; seconds by map too), of image and semantic scoring,
    the score caches' hits and computes, and the torch thread counts seen when extracting and fitting."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.threads: set[int] = set()
        self.by_map: dict[str, float] = defaultdict(float)  # fit seconds by map name
        self._depth: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[type, str, object]] = []
        self._caches: list = []

    def _wrap(self, owner: type, name: str, key: str, after=None) -> None:
        """Times ``owner.name`` under ``key`` (outermost call only: nested and recursive calls count once)."""
        original = owner.__dict__[name]
        probe = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if probe._depth[key]:
                return original(*args, **kwargs)
            probe._depth[key] += 1
            start = time.perf_counter()
            try:
                out = original(*args, **kwargs)
            finally:
                probe._depth[key] -= 1
            seconds = time.perf_counter() - start
            probe.seconds[key] += seconds
            if after is not None:
                after(args, out, seconds)
            return out

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "Probe":
        from featmap.features.backbone import Backbone
        from featmap.features.store import FeatureStore
        from featmap.maps.base import Mapping
        from featmap.run.scores import ScoreCache
        from featmap.score.imagespace import ImageScorer
        from featmap.score.semantic import SemanticScorer

        def extracted(args, out, seconds):
            self.counts["extraction"] += int(out)
            self.threads.add(torch.get_num_threads())

        self._wrap(FeatureStore, "ensure", "extraction", extracted)
        forward = Backbone.__dict__["features"]
        probe = self

        @functools.wraps(forward)
        def features(backbone, images, layers=None):  # a forward inside extraction (the judges' are not)
            if not probe._depth["extraction"]:
                return forward(backbone, images, layers)
            out, seconds = _timed(lambda: forward(backbone, images, layers))
            probe.seconds["forward"] += seconds
            probe.counts["forward"] += len(images)
            return out

        Backbone.features = features
        self._undo.append((Backbone, "features", forward))

        def fitted(args, out, seconds):
            self.counts["fit"] += 1
            self.by_map[getattr(args[0], "name", type(args[0]).__name__)] += seconds
            self.threads.add(torch.get_num_threads())

        classes, todo = [], [Mapping]
        while todo:
            cls = todo.pop()
            classes.append(cls)
            todo += cls.__subclasses__()
        for cls in classes:
            if "fit" in cls.__dict__:
                self._wrap(cls, "fit", "fit", fitted)
        learned = [cls for cls in classes if cls.__dict__.get("learned") is True]
        for cls in learned:  # LearnedMapping: training is timed apart from the closed-form fits
            if "fit" in cls.__dict__:
                self._wrap(cls, "fit", "training", lambda args, out, seconds: self.counts.__setitem__(
                    "training", self.counts["training"] + 1))
        for cls, key in ((ImageScorer, "image_scoring"), (SemanticScorer, "semantic_scoring")):
            for name in ("__init__", *[n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")]):
                self._wrap(cls, name, key)
        init = ScoreCache.__dict__["__init__"]

        def register(cache, *args, **kwargs):
            init(cache, *args, **kwargs)
            probe._caches.append(cache)

        ScoreCache.__init__ = register
        self._undo.append((ScoreCache, "__init__", init))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()
        self.counts["scores_cached"] = sum(c.hits for c in self._caches)
        self.counts["scores_computed"] = sum(c.computed for c in self._caches)

    def report(self) -> dict:
        return {"seconds": dict(self.seconds), "counts": dict(self.counts), "threads": sorted(self.threads),
                "fit_seconds_by_map": dict(self.by_map)}


# ---------------------------------------------------------------------------------------------------------------
# Extraction, disk, single maps

def extraction(store, views, manipulation) -> dict:
    """Images/s of the bare forward (decoded images in memory) vs through the cache layer, cold and warm."""
    todo = [(v, m) for v in views for m in (None, manipulation)]
    decoded = np.stack([store.image(v, m) for v, m in todo])  # (N, S, S, 3) uint8, outside the timed part
    bs = store.batch_size
    # warm-up on each batch shape the timed pass will see: first-call allocations, and on a GPU the kernels loaded
    # and chosen per shape (measured on an H200: 61 images/s for a bare pass warmed on 2 images only), are not
    # throughput
    for shape in {min(bs, len(decoded)), len(decoded) % bs} - {0}:
        store.backbone.features(decoded[:shape])
    _, bare_s = _timed(lambda: [store.backbone.features(decoded[i:i + bs]) for i in range(0, len(decoded), bs)])
    with Probe() as probe:
        n, cold_s = _timed(lambda: store.ensure(views, [None, manipulation]))
    if n != len(todo):
        raise RuntimeError(f"the cache was not cold: {n} of {len(todo)} extracted")
    n_warm, warm_s = _timed(lambda: store.ensure(views, [None, manipulation]))
    layer = store.backbone.layers[-1]
    _, load_s = _timed(lambda: store.load(views, manipulation, layer))
    return {"images": len(todo), "bare_forward_images_per_s": len(todo) / bare_s,
            "cache_cold_images_per_s": len(todo) / cold_s, "overhead_ratio_cold_vs_bare": cold_s / bare_s,
            "rate_fraction_of_bare_forward": bare_s / cold_s,
            "forwards_per_image": probe.counts["forward"] / len(todo),
            "forward_seconds_in_cold": probe.seconds["forward"],
            "cache_warm_seconds": warm_s, "cache_warm_extracted": n_warm,
            "cache_warm_speedup_vs_cold": cold_s / max(warm_s, 1e-9),
            f"cache_load_{layer}_maps_per_s": len(views) / load_s}


def disk(store, views, manipulation) -> dict:
    """Bytes per image in the cache (actual .npy files) vs the reference's float32 memmaps (4 C H W per layer)."""
    ours = {layer: np.mean([store.cache.path(store.key(v, m, layer)).stat().st_size
                            for v in views for m in (None, manipulation)]) for layer in store.backbone.layers}
    reference = {layer: 4 * int(np.prod(spec.shape)) for layer, spec in store.backbone.specs.items()}
    return {"layers": list(store.backbone.layers), "ours_bytes_per_image": float(sum(ours.values())),
            "reference_float32_bytes_per_image": sum(reference.values()),
            "ratio_ours_vs_reference": float(sum(ours.values())) / sum(reference.values()),
            "per_layer": {layer: {"ours": float(ours[layer]), "reference": reference[layer]} for layer in ours}}


CONVERGENCE = ("steps", "best_step", "stopped_early", "train_loss", "best_val_loss")


def _fit_and_test(name: str, options: MapOptions, store, views, manipulation, layer: str, batch: int) -> dict:
    """Fits map ``name`` on the training views (validation steers it) and returns its seconds, test cosine and, for
    a trained map, its convergence (steps, the kept step, early stopping, training and validation loss)."""
    spatial = "applied" if manipulation.grid_op is not None else "none"
    data = PairData(store, {"train": views["train"], "val": views["val"]}, manipulation, layer, spatial, batch)
    mapping, seconds = _timed(lambda: get_mapping(name, options).fit(data))  # includes reading the cache
    x_test, y_test = store.load(views["test"], None, layer), store.load(views["test"], manipulation, layer)
    if spatial == "applied":
        x_test = manipulation.grid_op(x_test)
    with torch.no_grad():
        pred = torch.cat([mapping.predict(x_test[i:i + batch]) for i in range(0, len(x_test), batch)])
    out = {"fit_seconds": seconds, "test_cos_mean": float(cos_mean(pred, y_test).mean()),
           "n_params": int(mapping.n_params()),
           **{k: float(v) for k, v in mapping.extra_metrics().items() if k in CONVERGENCE + ("ridge_alpha",)}}
    if name == "linear":  # the trained maps' objective, on the same pairs
        out.update(objective(mapping, data, options.train))
    return out


def _views(split, train_views: int = 1) -> dict:
    return {part: split.views(part, train_views) for part in ("train", "val", "test")}


def linear_maps(store, split, manipulation, layer: str, device: str, batch: int, reference_steps: int) -> dict:
    """The shared linear map on the same cached features: closed form against gradient descent (``linear_sgd``)
    with the book's training settings (from W = I with the closed form's prior) and with the reference protocol's
    (random initialisation, AdamW 1e-4, up to ``reference_steps`` steps; the reference: 11,900): steps, the kept
    step, whether early stopping ended it, seconds, and its validation loss against the closed form's on the same
    objective."""
    from featmap.run.chapter import map_options
    from featmap.run.presets import chapter_config

    views = _views(split)
    out = {"layer": layer, "manipulation": manipulation.name, "train_views": len(views["train"]),
           "val_views": len(views["val"]), "test_views": len(views["test"])}
    book, _ = chapter_config("geometric")
    recipes = {"book": dataclasses.replace(map_options(book, progress=False), device=device),
               "reference": MapOptions(device=device, progress=False, start="scratch",
                                       train=TrainConfig(max_steps=reference_steps))}
    with tempfile.TemporaryDirectory() as maps:  # gradient descent must train, not load an earlier run's map
        for recipe, options in recipes.items():
            options = dataclasses.replace(options, cache_dir=maps)
            out.setdefault("linear", _fit_and_test("linear", options, store, views, manipulation, layer, batch))
            sgd = _fit_and_test("linear_sgd", options, store, views, manipulation, layer, batch)
            sgd["settings"] = {k: getattr(options.train, k) for k in ("lr", "batch_size", "max_steps", "patience",
                                                                      "eval_every", "plateau_steps")}
            sgd["start"] = options.start
            sgd["val_loss_above_closed_form"] = sgd["best_val_loss"] / out["linear"]["best_val_loss"] - 1
            out[f"linear_sgd_{recipe}"] = sgd
    out["time_ratio_sgd_vs_closed_form"] = out["linear_sgd_book"]["fit_seconds"] / out["linear"]["fit_seconds"]
    return out


def trained_map(store, split, manipulation, args) -> dict:
    """One trained map at ``args.map_size`` (reference: the study's width) with the reference protocol's training
    settings in steps, from its random initialisation (``args.trained_steps`` caps it): seconds, steps run, seconds
    per step, whether early stopping ended it, test cosine."""
    views = _views(split)
    settings = TrainConfig(max_steps=args.trained_steps)
    with tempfile.TemporaryDirectory() as maps:  # trains, never loads an earlier run's map
        options = MapOptions(size=args.map_size, device=args.device, progress=False, cache_dir=maps, train=settings,
                             start="scratch")
        got = _fit_and_test(args.trained_map, options, store, views, manipulation, args.fit_layer, args.batch_size)
    return {"map": args.trained_map, "map_size": args.map_size, "size": MAP_SIZES[args.map_size],
            "layer": args.fit_layer, "manipulation": manipulation.name, "device": str(resolve_device(args.device)),
            "train_views": len(views["train"]), "max_steps": args.trained_steps, **got,
            "seconds_per_step": got["fit_seconds"] / max(got.get("steps", 1), 1)}


# ---------------------------------------------------------------------------------------------------------------
# The small book: every computing chapter, cold then warm

def book_values(args, chapter: str, cache: str) -> dict:
    """Returns the parameters the small book gives ``chapter``: the run's sizes and thread policy, SMALL_BOOK's
    edits, then the --book-params overrides (each only where the chapter takes it)."""
    from featmap.run.presets import defaults

    takes = defaults(chapter)
    overrides = yaml.safe_load(args.book_params or "{}") or {}
    if not isinstance(overrides, dict):
        raise SystemExit(f"--book-params must be a YAML mapping, got {args.book_params!r}")
    per_chapter = overrides.pop("chapters", None) or {}
    unknown = [k for k in per_chapter if k not in BOOK_CHAPTERS] if isinstance(per_chapter, dict) else per_chapter
    if unknown:
        raise SystemExit(f"--book-params: chapters: {unknown} are not chapters of the small book "
                         f"({', '.join(BOOK_CHAPTERS)})")
    common = {"max_images": args.book_images, "threads": args.threads or None, "device": args.device,
              "batch_size": args.batch_size, "cache_dir": cache}
    values = {**common, **SMALL_BOOK.get(chapter, {}), **overrides, **per_chapter.get(chapter, {})}
    return {k: v for k, v in values.items() if k in takes}


def book_child(spec: dict) -> dict:
    """Runs one chapter as the notebook does (its parameters through featmap.run.presets) under a Probe; returns
    its seconds, peak memory, RunResult.timings (summed over a chapter's runs) and the probe's report."""
    from featmap.run.backbones import run_backbones
    from featmap.run.chapter import run_chapter
    from featmap.run.layers import run_layers
    from featmap.run.presets import chapter_config

    chapter = spec["chapter"]
    config, extra = chapter_config(chapter, spec["values"])
    with Probe() as probe:
        start = time.perf_counter()
        if chapter == "layers":
            run_layers(config, control=extra["control_weights"], ranks=extra["ranks"])
            runs = []
        elif chapter == "backbones":
            second = dataclasses.replace(config, backbone=extra["second_backbone"], layers=extra["second_layers"])
            runs = run_backbones(config, second)[1]
        else:
            runs = [run_chapter(config)]
        seconds = time.perf_counter() - start
    timings: dict[str, float] = defaultdict(float)
    for run in runs:
        for k, v in run.timings.items():
            timings[k] += v
    out = {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "timings": dict(timings), "probe": probe.report(),
           "extracted": sum(r.extracted for r in runs) if runs else probe.counts["extraction"]}
    return {**out, "phase_seconds": phases(out)}


def phases(run: dict) -> dict[str, float]:
    """Returns a chapter run's seconds by phase (PHASES): RunResult.timings where the chapter returns them (the
    layers chapter does not: the probe's), closed-form fits and training split by the probe."""
    t, probe = run["timings"], run["probe"]["seconds"]
    fit = t.get("fit_seconds", probe.get("fit", 0.0))
    training = min(probe.get("training", 0.0), fit)
    out = {"prepare": t.get("prepare_seconds", 0.0),
           "extraction": t.get("extract_seconds", probe.get("extraction", 0.0)),
           "fits": fit - training, "training": training, "inverter": t.get("inverter_seconds", 0.0),
           "image_scoring": probe.get("image_scoring", 0.0), "semantic_scoring": probe.get("semantic_scoring", 0.0)}
    out["other"] = max(run["seconds"] - sum(out.values()), 0.0)
    return out


def _extraction_rate(runs: list[dict]) -> dict:
    """Returns the extraction rate (every FeatureStore.ensure of the runs) against the rate of the backbone forwards
    inside it: their ratio is the share of extraction spent in the forward pass itself (1: nothing else)."""
    images = sum(r["probe"]["counts"].get("extraction", 0) for r in runs)
    seconds = sum(r["probe"]["seconds"].get("extraction", 0.0) for r in runs)
    forwarded = sum(r["probe"]["counts"].get("forward", 0) for r in runs)
    forward_s = sum(r["probe"]["seconds"].get("forward", 0.0) for r in runs)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None,
            "forward_images": forwarded, "forward_seconds": forward_s,
            "forward_images_per_s": forwarded / forward_s if forward_s else None,
            "rate_fraction_of_forward": forward_s / seconds if seconds else None,
            "forwards_per_image": forwarded / images if images else None}  # None: nothing was extracted


def _by_map(runs: list[dict]) -> dict[str, float]:
    """Returns the fit seconds of the runs by map name (closed-form and trained), largest first."""
    total: dict[str, float] = defaultdict(float)
    for run in runs:
        for name, seconds in run["probe"].get("fit_seconds_by_map", {}).items():
            total[name] += seconds
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _summary(cold: list[dict], warm: list[dict]) -> dict:
    """Returns the figures of one chapter (or, given several chapters' runs, of the whole small book)."""
    cold_s, warm_s = sum(r["seconds"] for r in cold), sum(r["seconds"] for r in warm)
    by_phase = {p: sum(phases(r)[p] for r in cold) for p in PHASES}
    counts = lambda key: sum(r["probe"]["counts"].get(key, 0) for r in warm)  # noqa: E731
    return {"cold_seconds": cold_s, "warm_seconds": warm_s, "warm_speedup": cold_s / warm_s if warm_s else None,
            "cold_process_seconds": sum(r.get("process_seconds", r["seconds"]) for r in cold),
            "warm_process_seconds": sum(r.get("process_seconds", r["seconds"]) for r in warm),
            "peak_rss_mib_cold": max(r["peak_rss_mib"] for r in cold),
            "peak_rss_mib_warm": max(r["peak_rss_mib"] for r in warm),
            "phase_seconds": by_phase, "shares": {p: s / cold_s if cold_s else 0.0 for p, s in by_phase.items()},
            "extraction": _extraction_rate(cold),
            "warm_rerun": {"extracted": counts("extraction"), "scores_computed": counts("scores_computed"),
                           "scores_cached": counts("scores_cached"), "fits": counts("fit"),
                           "trained": counts("training")},
            "fit_seconds_by_map": _by_map(cold),
            "threads_seen": sorted({n for r in cold + warm for n in r["probe"]["threads"]})}


@contextlib.contextmanager
def _environment(**values):
    """Sets environment variables (and restores them, and torch's thread count) around an in-process run."""
    before = {k: os.environ.get(k) for k in values}
    threads = torch.get_num_threads()
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)


def _run_chapter(spec: dict, env: dict, in_process: bool) -> dict:
    start = time.perf_counter()
    if in_process:
        with _environment(**env):
            got = json.loads(json.dumps(book_child(spec)))  # what a child process would print
    else:
        proc = subprocess.run([sys.executable, __file__, "--book-child", json.dumps(spec)], text=True,
                              capture_output=True, env={**os.environ, **env})
        if proc.returncode:
            return {"error": proc.stderr.strip()[-3000:] or f"exit status {proc.returncode}"}
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**got, "process_seconds": time.perf_counter() - start}


def book(args) -> dict:
    """Runs the small book twice on one fresh cache: cold (every chapter in order, sharing the cache as make book
    does), then warm (the same again). A failing chapter is recorded (``failed``) and the others still run."""
    chapters = _names(args.book_chapters)
    unknown = [c for c in chapters if c not in BOOK_CHAPTERS]
    if unknown:
        raise SystemExit(f"--book-chapters: {unknown} compute nothing or are not chapters; of {BOOK_CHAPTERS}")
    runs: dict[str, dict[str, dict]] = {c: {} for c in chapters}
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        env = {"FEATMAP_RESULTS": str(Path(tmp) / "results"), "FEATMAP_CACHE": cache}  # never the book's own
        specs = {c: {"chapter": c, "values": book_values(args, c, cache)} for c in chapters}
        for run in ("cold", "warm"):
            for chapter in chapters:
                if "error" not in runs[chapter].get("cold", {}):
                    print(f"bench: book {run} {chapter} ...", file=sys.stderr, flush=True)
                    runs[chapter][run] = _run_chapter(specs[chapter], env, args.book_in_process)
    failed = {c: r.get("cold", {}).get("error") or r.get("warm", {}).get("error") for c, r in runs.items()}
    failed = {c: e for c, e in failed.items() if e}
    ok = [c for c in chapters if c not in failed]
    parameters = {c: {k: v for k, v in s["values"].items() if k != "cache_dir"} for c, s in specs.items()}
    out = {"mode": "in-process" if args.book_in_process else "a fresh process per chapter run",
           "parameters": parameters, "chapters": {}, "failed": failed}
    for chapter in ok:
        cold, warm = runs[chapter]["cold"], runs[chapter]["warm"]
        out["chapters"][chapter] = {**_summary([cold], [warm]), "timings_cold": cold["timings"],
                                    "timings_warm": warm["timings"], "probe_cold": cold["probe"],
                                    "probe_warm": warm["probe"], "extracted_cold": cold["extracted"]}
    if ok:
        out["total"] = _summary([runs[c]["cold"] for c in ok], [runs[c]["warm"] for c in ok])
    return out


# ---------------------------------------------------------------------------------------------------------------
# CUDA

def _forward_flops(backbone, size: int) -> float:
    """Returns the matrix FLOPs of one image's forward pass up to the last extracted layer."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device=backbone.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone.forward_layers(x)
    return float(counter.get_total_flops())


def _per_call_seconds(fn, device, reps: int = 20, warmup: int = 3) -> float:
    """Returns the mean seconds of ``fn()`` on ``device`` after a warm-up, waiting for queued GPU work."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def _matmul_tflops(device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Returns the measured dense matmul rate of ``device`` in ``dtype`` (TFLOPS)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _per_call_seconds(lambda: a @ b, device) / 1e12


def cuda_section(args, store) -> dict:
    """Backbone images/s on CUDA in float32 (the product's path) and bf16 autocast, against the bf16 matrix rate."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    device = torch.device("cuda")
    backbone = store.backbone
    backbone.model.to(device)
    backbone.device = device
    size = backbone.preprocessing.size
    flops = _forward_flops(backbone, size)
    x = torch.randn(args.cuda_batch, 3, size, size, device=device)
    out = {"device": torch.cuda.get_device_name(device), "batch": args.cuda_batch,
           "forward_gflops_per_image": flops / 1e9}
    for name, dtype in (("float32", None), ("bf16_autocast", torch.bfloat16)):
        def forward(dtype=dtype):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                backbone.forward_layers(x)

        out[f"{name}_images_per_s"] = args.cuda_batch / _per_call_seconds(forward, device)
    measured = _matmul_tflops(device)
    spec = next((v for k, v in BF16_SPEC_TFLOPS.items() if k in out["device"]), None)
    achieved = out["bf16_autocast_images_per_s"] * flops / 1e12
    out.update(achieved_tflops_bf16=achieved, matmul_bf16_tflops_measured=measured,
               fraction_of_measured_bf16_matmul_rate=achieved / measured,
               bf16_spec_tflops=spec, fraction_of_spec_bf16_rate=achieved / spec if spec else None)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The table and main

def _pct(shares: dict) -> str:
    return ", ".join(f"{p} {v:.0%}" for p, v in shares.items() if v >= 0.005)


def _table(results: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "extraction" in results:
        ext = results["extraction"]
        rows += [
            ("extraction", f"bare backbone forward ({ext['images']} images)",
             f"{ext['bare_forward_images_per_s']:.1f} img/s"),
            ("extraction", "through the cache layer, cold: rate / share of the bare forward rate",
             f"{ext['cache_cold_images_per_s']:.1f} img/s / {ext['rate_fraction_of_bare_forward']:.2f} "
             f"({ext['forwards_per_image']:.2f} forwards per image)"),
            ("extraction", "warm rerun (nothing extracted)",
             f"{ext['cache_warm_seconds']:.3f} s ({ext['cache_warm_speedup_vs_cold']:.0f}x faster than cold)")]
    if "disk" in results:
        dsk = results["disk"]
        rows += [("disk", f"bytes per image over {', '.join(dsk['layers'])}: ours (float16 .npy)",
                  f"{dsk['ours_bytes_per_image'] / 1024:.1f} KiB"),
                 ("disk", "reference float32 memmaps", f"{dsk['reference_float32_bytes_per_image'] / 1024:.1f} KiB "
                                                       f"(ours {dsk['ratio_ours_vs_reference']:.3f}x)")]
    if "linear_map" in results:
        lin = results["linear_map"]
        rows.append(("linear map", f"closed form: fit s / test cos / validation loss ({lin['layer']}, "
                                   f"{lin['manipulation']})",
                     f"{lin['linear']['fit_seconds']:.3f} s / {lin['linear']['test_cos_mean']:.4f} / "
                     f"{lin['linear']['best_val_loss']:.4f}"))
        for recipe in ("book", "reference"):
            sgd = lin.get(f"linear_sgd_{recipe}")
            if sgd:
                rows.append(("linear map", f"gradient descent, {recipe} settings: fit s / steps (kept, early stop) / "
                                           "test cos / validation loss against the closed form's",
                             f"{sgd['fit_seconds']:.2f} s / {sgd['steps']:.0f} ({sgd['best_step']:.0f}, "
                             f"{'yes' if sgd['stopped_early'] else 'no'}) / {sgd['test_cos_mean']:.4f} / "
                             f"{sgd['val_loss_above_closed_form']:+.1%}"))
    if "trained_map" in results:
        tm = results["trained_map"]
        rows.append(("trained map", f"{tm['map']} at map_size {tm['map_size']} ({tm['device']}): fit s / steps / "
                                    "s per step / early stop / test cos",
                     f"{tm['fit_seconds']:.1f} s / {tm.get('steps', float('nan')):.0f} / "
                     f"{tm['seconds_per_step']:.3f} s / {'yes' if tm.get('stopped_early') else 'no'} / "
                     f"{tm['test_cos_mean']:.4f}"))
    if "book" in results:
        bk = results["book"]
        for name, ch in [*bk["chapters"].items(), *([("total", bk["total"])] if "total" in bk else [])]:
            label = "small book" if name == "total" else name
            rows += [(label, "cold / warm seconds (peak RSS cold)",
                      f"{ch['cold_seconds']:.1f} / {ch['warm_seconds']:.1f} s ({ch['peak_rss_mib_cold']:.0f} MiB)"),
                     (label, "cold: share of the time", _pct(ch["shares"])),
                     (label, "extraction: img/s, share of it in the forward, forwards per image",
                      "{images_per_s:.1f} img/s, {rate_fraction_of_forward:.2f}, {forwards_per_image:.2f}"
                      .format(**ch["extraction"]) if ch["extraction"]["images"] else "nothing extracted"),
                     (label, "warm rerun: extracted / scores computed / trained",
                      f"{ch['warm_rerun']['extracted']} / {ch['warm_rerun']['scores_computed']} / "
                      f"{ch['warm_rerun']['trained']}")]
        rows += [(chapter, "FAILED", error.splitlines()[-1][:100] if error else "") for chapter, error
                 in bk["failed"].items()]
    if "cuda" in results:
        cu = results["cuda"]
        if "skipped" in cu:
            rows.append(("cuda", "CUDA", f"skipped: {cu['skipped']}"))
        else:
            spec = f", {cu['fraction_of_spec_bf16_rate']:.1%} of the {cu['bf16_spec_tflops']:.0f} TFLOPS spec" \
                if cu["bf16_spec_tflops"] else ""
            rows += [("cuda", f"{cu['device']}: float32 / bf16 images/s (batch {cu['batch']})",
                      f"{cu['float32_images_per_s']:.0f} / {cu['bf16_autocast_images_per_s']:.0f}"),
                     ("cuda", "achieved bf16 rate vs measured bf16 matmul rate",
                      f"{cu['achieved_tflops_bf16']:.1f} / {cu['matmul_bf16_tflops_measured']:.0f} TFLOPS "
                      f"({cu['fraction_of_measured_bf16_matmul_rate']:.1%}{spec})")]
    return rows


def main(argv=None) -> dict:
    from featmap.core.memory import keep_freed_memory

    keep_freed_memory()  # as the book's chapters run: timings comparable with make book's
    args = _parser().parse_args(argv)
    if args.book_child:
        print(json.dumps(book_child(json.loads(args.book_child))))
        return {}
    sections = _names(args.sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    layers = _names(args.layers)
    if args.fit_layer not in layers:
        raise SystemExit(f"--fit-layer {args.fit_layer!r} must be one of --layers {layers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device": str(resolve_device(args.device)),
                           "load_average_at_start": os.getloadavg()},
               "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                              if k != "book_child"}}
    def section(name: str, run) -> None:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        results[name], results.setdefault("section_seconds", {})[name] = _timed(run)
        # written after every section: a run stopped at a time limit keeps what it measured
        atomic_write(args.out, lambda f: f.write(json.dumps(results, indent=1).encode()))

    single = [s for s in sections if s != "book"]
    with tempfile.TemporaryDirectory() as cache:
        if single:  # the single-map sections share one store of --images photos
            config = RunConfig(chapter="bench", manipulations=[args.manipulation], layers=layers,
                               max_images=args.images, train_views=1, threads=args.threads or None,
                               device=args.device, batch_size=args.batch_size, cache_dir=cache)
            _, split, store, (manipulation,) = prepare(config)
            store.progress = False
            views = [v for part in ("train", "val", "test") for v in split.views(part, 1)]
            if "extraction" in sections:
                section("extraction", lambda: extraction(store, views, manipulation))
            store.ensure(views, [None, manipulation])  # the other sections read the cache
            if "disk" in sections:
                section("disk", lambda: disk(store, views, manipulation))
            if "linear_map" in sections:
                section("linear_map", lambda: linear_maps(store, split, manipulation, args.fit_layer, args.device,
                                                          args.batch_size, args.trained_steps))
            if "trained_map" in sections:
                section("trained_map", lambda: trained_map(store, split, manipulation, args))
        if "cuda" in sections:  # after the store's sections: it moves the store's backbone to the device
            section("cuda", lambda: cuda_section(args, store))
        if "book" in sections:  # last and longest (its chapters run in processes of their own)
            section("book", lambda: book(args))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    atomic_write(args.out, lambda f: f.write(json.dumps(results, indent=1).encode()))
    rows = _table(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else []
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"written {args.out} in {results['seconds']:.0f} s (load average at start "
          f"{results['machine']['load_average_at_start'][0]:.1f}: timings are noisy on a shared machine)")
    if results.get("book", {}).get("failed"):
        raise SystemExit(f"bench: chapters failed: {', '.join(results['book']['failed'])} (see {args.out})")
    return results


if __name__ == "__main__":
    main()
