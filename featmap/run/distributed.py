"""Data-parallel heavy steps on torch.distributed (launched by ``torchrun`` or ``accelerate launch``).

The images are sharded across processes for editing and extraction (each process writes its own entries of
the content-addressed cache), the closed-form fits sum their sufficient statistics over processes, and the
trained maps run under DistributedDataParallel. A process started without a launcher gets the
single-process context, in which every collective is a no-op: the same code runs either way.
"""
from __future__ import annotations

import time
from dataclasses import replace

from featmap.core.distributed import Context
from featmap.maps.data import ShardedPairData
from featmap.run.chapter import map_options
from featmap.run.config import RunConfig
from featmap.run.plan import Plan
from featmap.run.prepare import extract, prepare, views_by_part, views_of


def prepare_chapter(config: RunConfig, context: Context) -> dict:
    """Runs the heavy steps of a chapter on this rank and returns a summary (identical on every rank).

    Editing and extraction of this rank's share of the views (all manipulations of a view on one rank, so
    each photo is decoded once), a barrier, then every fit the chapter makes: closed-form maps from statistics
    summed over ranks, trained maps under DDP into the map cache. A chapter run afterwards (one process)
    extracts and trains nothing. The summary holds per-rank counts, wall times and the closed-form fits.
    """
    if context.distributed:
        config = replace(config, device=context.device(config.device))
    start = time.perf_counter()
    images, split, store, manipulations = prepare(config)
    store.progress = context.is_main
    parts = views_by_part(config, split)
    views = parts["train"] + parts["val"] + parts["test"]
    t0 = time.perf_counter()
    extracted = extract(store, parts, manipulations, context)
    extract_local = time.perf_counter() - t0
    context.barrier()
    extract_wall = time.perf_counter() - t0
    options = map_options(config, progress=context.is_main)
    fits, trained, times = {}, [], {"stats_seconds": 0.0, "closed_form_seconds": 0.0, "train_seconds": 0.0}
    plan = Plan.build(config, manipulations, store.backbone.layers)
    for cell in plan.cells:  # the chapter's own plan: the same cells, the same maps, the same cache keys
        own = views_of(cell.manipulation, parts)
        data = ShardedPairData(context, store, {"train": own["train"], "val": own["val"]}, cell.manipulation,
                               cell.layer, cell.spatial, config.batch_size)
        t1 = time.perf_counter()
        data.stats("train"), data.stats("val")  # one sharded pass, shared by the closed-form maps
        times["stats_seconds"] += time.perf_counter() - t1
        for cls in cell.mappings:
            mapping = cls(options)
            t2 = time.perf_counter()
            if cls.learned:
                mapping.fit(data, context=context)
                trained.append(mapping.identity(data))
                times["train_seconds"] += time.perf_counter() - t2
                continue
            mapping.fit(data)
            times["closed_form_seconds"] += time.perf_counter() - t2
            state = {k: getattr(mapping, k) for k in ("weight", "bias", "delta") if hasattr(mapping, k)}
            if state:
                fits[f"{cell.name}/{cls.name}"] = state | mapping.extra_metrics()
    per_rank = context.gather({"rank": context.rank, "views": len(context.shard(views)), "images": extracted,
                               "cache_writes": store.cache.writes, "extract_seconds": extract_local})
    return {"chapter": config.chapter, "world_size": context.world_size, "backend": context.backend,
            "photos": len(images), "views": len(views), "manipulations": len(manipulations),
            "images_extracted": sum(r["images"] for r in per_rank), "per_rank": per_rank,
            "extract_seconds": extract_wall, **times, "fit_seconds": times["stats_seconds"] +
            times["closed_form_seconds"], "total_seconds": time.perf_counter() - start,
            "closed_form_fits": len(fits), "trained_maps": trained, "fits": fits}
