"""featmap benchmark: one run, the same features, side by side. Writes bench/results.json and prints a table.

  shared linear map     closed form (streaming ridge) vs gradient descent with the reference's settings
  feature extraction    images/s through the cache layer vs the bare backbone forward; warm vs cold
  disk                  bytes per image in the cache vs the reference's float32 memmaps for the same layers
  one chapter           cold run vs warm rerun, and its peak memory (each in a fresh process)
  CUDA (when present)   images/s and the achieved fraction of the device's bf16 matrix rate

Sizes are parameters (``python bench/run.py --help``; ``make bench BENCH_IMAGES=...``). Every number comes
from featmap's own code paths (Backbone, FeatureStore, PairData, MAPPINGS, run_chapter).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featmap.core.device import resolve_device
from featmap.core.io import REPO_ROOT, atomic_write
from featmap.maps.base import MapOptions, get_mapping
from featmap.maps.data import PairData
from featmap.run.chapter import prepare, run_chapter
from featmap.run.config import RunConfig
from featmap.score.metrics import cos_mean
from featmap.train.loop import TrainConfig

OUT = REPO_ROOT / "bench" / "results.json"
# Dense bf16 tensor-core rates from the vendors' data sheets (no sparsity), for the devices we know.
BF16_SPEC_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=int(env("BENCH_IMAGES", 60)),
                   help="photos (a seeded subset of the default set) for extraction, disk and the linear maps")
    p.add_argument("--layers", default=env("BENCH_LAYERS", "blocks.2,blocks.4,blocks.6"),
                   help="comma-separated layers extracted (disk is summed over them)")
    p.add_argument("--fit-layer", default=env("BENCH_FIT_LAYER", "blocks.6"), help="layer of the linear-map comparison")
    p.add_argument("--manipulation", default=env("BENCH_MANIPULATION", "grayscale"))
    p.add_argument("--chapter-images", type=int, default=int(env("BENCH_CHAPTER_IMAGES", 40)),
                   help="photos of the one-chapter run (cold, warm, peak memory)")
    p.add_argument("--chapter-mappings", help="comma-separated mappings of the one-chapter run",
                   default=env("BENCH_CHAPTER_MAPPINGS", "identity,additive,linear,local_linear,mlp"))
    p.add_argument("--batch-size", type=int, default=int(env("BENCH_BATCH", 32)))
    # One thread by default: on a shared 2-core machine torch's default of 2 ran the SGD fit 11x slower.
    p.add_argument("--threads", type=int, default=int(env("BENCH_THREADS", 1)),
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=env("BENCH_DEVICE", "auto"))
    p.add_argument("--cuda-batch", type=int, default=int(env("BENCH_CUDA_BATCH", 128)))
    p.add_argument("--out", type=Path, default=Path(env("BENCH_OUT", OUT)))
    p.add_argument("--chapter-child", help=argparse.SUPPRESS)  # internal: one chapter run in a fresh process
    return p


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def extraction(store, views, manipulation) -> dict:
    """Images/s of the bare forward (decoded images in memory) vs through the cache layer, cold and warm."""
    todo = [(v, m) for v in views for m in (None, manipulation)]
    decoded = np.stack([store.image(v, m) for v, m in todo])  # (N, S, S, 3) uint8, outside the timed part
    bs = store.batch_size
    store.backbone.features(decoded[:2])  # warm-up: first-call allocations are not throughput
    _, bare_s = _timed(lambda: [store.backbone.features(decoded[i:i + bs]) for i in range(0, len(decoded), bs)])
    n, cold_s = _timed(lambda: store.ensure(views, [None, manipulation]))
    assert n == len(todo), f"the cache was not cold: {n} of {len(todo)} extracted"
    n_warm, warm_s = _timed(lambda: store.ensure(views, [None, manipulation]))
    layer = store.backbone.layers[-1]
    _, load_s = _timed(lambda: store.load(views, manipulation, layer))
    return {"images": len(todo), "bare_forward_images_per_s": len(todo) / bare_s,
            "cache_cold_images_per_s": len(todo) / cold_s, "overhead_ratio_cold_vs_bare": cold_s / bare_s,
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


def linear_maps(store, split, manipulation, layer: str, device: str, batch: int) -> dict:
    """Shared linear map on the same cached features: closed form vs gradient descent (reference settings)."""
    views = {part: split.views(part, 1) for part in ("train", "val", "test")}
    x_test = store.load(views["test"], None, layer)
    y_test = store.load(views["test"], manipulation, layer)
    out = {"layer": layer, "manipulation": manipulation.name, "train_views": len(views["train"]),
           "val_views": len(views["val"]), "test_views": len(views["test"])}
    with tempfile.TemporaryDirectory() as maps:  # gradient descent must train, not load an earlier run's map
        settings = TrainConfig()  # the reference protocol's: AdamW 1e-4, batch 32, up to 100 epochs, patience 6
        options = MapOptions(ridge="auto", device=device, progress=False, cache_dir=maps, train=settings)
        for name in ("linear", "linear_sgd"):
            data = PairData(store, {"train": views["train"], "val": views["val"]}, manipulation, layer, "none", batch)
            mapping, seconds = _timed(lambda: get_mapping(name, options).fit(data))  # includes reading the cache
            pred = torch.cat([mapping.predict(x_test[i:i + batch]) for i in range(0, len(x_test), batch)])
            out[name] = {"fit_seconds": seconds, "test_cos_mean": float(cos_mean(pred, y_test).mean()),
                         **{k: float(v) for k, v in mapping.extra_metrics().items()
                            if k in ("epochs", "best_val_loss", "ridge")}}
        out["linear_sgd"]["settings"] = {k: getattr(settings, k) for k in ("lr", "weight_decay", "batch_size",
                                                                           "max_epochs", "early_stop_patience")}
    out["time_ratio_sgd_vs_closed_form"] = out["linear_sgd"]["fit_seconds"] / out["linear"]["fit_seconds"]
    out["cos_gap_closed_form_minus_sgd"] = out["linear"]["test_cos_mean"] - out["linear_sgd"]["test_cos_mean"]
    return out


def _chapter_config(args, cache: str) -> dict:
    return {"chapter": "bench_chapter", "manipulations": ["rotation_90", "grayscale"], "layers": [args.fit_layer],
            "mappings": _names(args.chapter_mappings), "max_images": args.chapter_images, "bootstrap": 200,
            "threads": args.threads or None, "device": args.device, "batch_size": args.batch_size, "cache_dir": cache}


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def chapter_child(spec: str) -> None:
    """Runs one chapter from a JSON config; prints its wall time and this process's peak RSS as JSON."""
    result, seconds = _timed(lambda: run_chapter(RunConfig(**json.loads(spec))))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "extracted": result.extracted,
                      "rows": len(result.table), "timings": result.timings}))


def chapter(args) -> dict:
    """One chapter cold (empty cache) then warm (same cache), each in a fresh process for its peak memory."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = json.dumps(_chapter_config(args, str(Path(tmp) / "cache")))
        env = {**os.environ, "FEATMAP_RESULTS": str(Path(tmp) / "results")}  # never the book's results
        for run in ("cold", "warm"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--chapter-child", spec], env=env, text=True,
                                  capture_output=True)
            if proc.returncode:
                raise RuntimeError(f"the {run} chapter run failed:\n{proc.stderr[-3000:]}")
            out[run] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                        "process_seconds": time.perf_counter() - start}
    out["config"] = json.loads(spec)
    out["warm_speedup"] = out["cold"]["seconds"] / out["warm"]["seconds"]
    return out


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


def _table(results: dict) -> list[tuple[str, str, str]]:
    lin, ext, dsk, ch, cu = (results[k] for k in ("linear_map", "extraction", "disk", "chapter", "cuda"))
    rows = [
        ("linear map", f"closed form: fit s / test cos ({lin['layer']}, {lin['manipulation']})",
         f"{lin['linear']['fit_seconds']:.3f} s / {lin['linear']['test_cos_mean']:.4f}"),
        ("linear map", "gradient descent, reference settings: fit s / test cos / epochs",
         f"{lin['linear_sgd']['fit_seconds']:.2f} s / {lin['linear_sgd']['test_cos_mean']:.4f} / "
         f"{lin['linear_sgd'].get('epochs', float('nan')):.0f}"),
        ("linear map", "time ratio gradient descent / closed form", f"{lin['time_ratio_sgd_vs_closed_form']:.1f}x"),
        ("extraction", f"bare backbone forward ({ext['images']} images)",
         f"{ext['bare_forward_images_per_s']:.1f} img/s"),
        ("extraction", "through the cache layer, cold", f"{ext['cache_cold_images_per_s']:.1f} img/s"),
        ("extraction", "overhead ratio cold cache / bare forward", f"{ext['overhead_ratio_cold_vs_bare']:.2f}x"),
        ("extraction", "warm rerun (nothing extracted)",
         f"{ext['cache_warm_seconds']:.3f} s ({ext['cache_warm_speedup_vs_cold']:.0f}x faster than cold)"),
        ("disk", f"bytes per image over {', '.join(dsk['layers'])}: ours (float16 .npy)",
         f"{dsk['ours_bytes_per_image'] / 1024:.1f} KiB"),
        ("disk", "reference float32 memmaps", f"{dsk['reference_float32_bytes_per_image'] / 1024:.1f} KiB "
                                              f"(ours {dsk['ratio_ours_vs_reference']:.3f}x)"),
        ("chapter", f"cold run ({ch['config']['max_images']} photos, in-process seconds)",
         f"{ch['cold']['seconds']:.1f} s"),
        ("chapter", "warm rerun", f"{ch['warm']['seconds']:.1f} s ({ch['warm_speedup']:.1f}x faster)"),
        ("chapter", "peak RSS cold / warm", f"{ch['cold']['peak_rss_mib']:.0f} / {ch['warm']['peak_rss_mib']:.0f} MiB"),
    ]
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
    args = _parser().parse_args(argv)
    if args.chapter_child:
        chapter_child(args.chapter_child)
        return {}
    layers = _names(args.layers)
    if args.fit_layer not in layers:
        raise SystemExit(f"--fit-layer {args.fit_layer!r} must be one of --layers {layers}")
    started = time.perf_counter()
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                           "device": str(resolve_device(args.device)),
                           "load_average_at_start": os.getloadavg()},
               "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                              if k != "chapter_child"}}
    with tempfile.TemporaryDirectory() as cache:
        config = RunConfig(chapter="bench", manipulations=[args.manipulation], layers=layers, max_images=args.images,
                           train_views=1, threads=args.threads or None, device=args.device, batch_size=args.batch_size,
                           cache_dir=cache)
        _, split, store, (manipulation,) = prepare(config)
        store.progress = False
        views = [v for part in ("train", "val", "test") for v in split.views(part, 1)]
        results["extraction"] = extraction(store, views, manipulation)
        results["disk"] = disk(store, views, manipulation)
        results["linear_map"] = linear_maps(store, split, manipulation, args.fit_layer, args.device, args.batch_size)
        results["chapter"] = chapter(args)
        results["cuda"] = cuda_section(args, store)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write(json.dumps(results, indent=1).encode()))
    rows = _table(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"written {args.out} in {results['seconds']:.0f} s (load average at start "
          f"{results['machine']['load_average_at_start'][0]:.1f}: timings are noisy on a shared machine)")
    return results


if __name__ == "__main__":
    main()
