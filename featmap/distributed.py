"""Data-parallel heavy steps on torch.distributed (launched by ``torchrun`` or ``accelerate launch``).

The images are sharded across processes for editing and extraction (each process writes its own entries of
the content-addressed cache), the closed-form fits sum their sufficient statistics over processes, and the
trained maps run under DistributedDataParallel. A process started without a launcher gets the
single-process context, in which every collective is a no-op: the same code runs either way.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .backbones import resolve_device
from .config import RunConfig
from .mappings import LinearStats, PositionStats
from .editors import SplitEdit
from .pipeline import PairData, map_options, maps_to_fit, prepare, spatial_modes, views_of

T = TypeVar("T")
S = TypeVar("S", list, torch.Tensor)
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """This process's place in a data-parallel run; ``world_size`` 1 is a single process (collectives are no-ops)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo | nccl; None: no process group

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of world_size {self.world_size}")
        if self.world_size > 1 and self.backend is None:
            raise ValueError(f"a world of {self.world_size} processes needs a backend (gloo or nccl)")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Returns whether this is rank 0, the process that prints and writes shared files."""
        return self.rank == 0

    def shard(self, items: S) -> S:
        """Returns this rank's share of ``items`` (a list or a tensor): every world_size-th item from ``rank``.

        The shares of all ranks are disjoint and cover ``items``; round robin keeps their sizes within one.
        """
        return items[self.rank::self.world_size]

    def device(self, requested: str) -> str:
        """Returns the device this rank computes on: ``cuda:<local rank>`` for auto/cuda under a launcher, else
        ``requested`` unchanged."""
        if not self.distributed or resolve_device(requested).type != "cuda":
            return requested
        if requested not in ("auto", "cuda"):
            raise ValueError(f"under a launcher each rank takes the GPU of its local rank; give device 'auto' or "
                             f"'cuda', not {requested!r}")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible); start at "
                             f"most {torch.cuda.device_count()} processes per node")
        return f"cuda:{self.local_rank}"

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Waits until every rank gets here."""
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Returns the sum of ``tensor`` over ranks (same dtype and device as the input)."""
        if not self.distributed:
            return tensor
        buf = tensor.to(self._comm_device()).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def all_reduce_stats(self, stats: LinearStats) -> LinearStats:
        """Returns ``stats`` (changed in place) summed over ranks: the statistics of every rank's positions.

        Sums stay float64 and the counts integers, so the fit equals a single process's to rounding.
        """
        if not self.distributed:
            return stats
        stats.xtx = self.all_reduce(stats.xtx)
        stats.xty = self.all_reduce(stats.xty)
        yty = self.all_reduce(torch.as_tensor(stats.yty, dtype=torch.float64))
        stats.yty = yty if isinstance(stats, PositionStats) else float(yty)
        stats.n = int(self.all_reduce(torch.tensor(stats.n, dtype=torch.int64)))
        return stats

    def gather(self, obj: T) -> list[T]:
        """Returns every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Returns rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def sync_batchnorm(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Returns ``net`` with batch norm over the global batch (SyncBatchNorm) when distributed on CUDA, else
        ``net`` itself.

        PyTorch has no SyncBatchNorm for the CPU, so gloo runs normalise each rank's share of a batch by its own
        statistics. Parameters, buffers and state-dict keys stay ``net``'s own.
        """
        if not self.distributed or device.type != "cuda":
            return net
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Returns ``net`` under DistributedDataParallel (gradients averaged over ranks) when distributed, else
        ``net`` itself; either way it shares ``net``'s parameters."""
        if not self.distributed:
            return net
        return nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_buffers(self, net: nn.Module) -> None:
        """Copies rank 0's buffers (batch-norm running statistics) to every rank, so all ranks hold one model."""
        if self.distributed:
            for buf in net.buffers():
                synced = buf.to(self._comm_device())
                dist.broadcast(synced, src=0)
                buf.copy_(synced)


def init(device: str = "auto", timeout_minutes: float = 60.0) -> Context:
    """Returns this process's context, joining the process group that ``torchrun`` (or ``accelerate launch``)
    describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the single-process context when
    WORLD_SIZE is absent or 1.

    The backend is nccl when ``device`` resolves to CUDA, else gloo. ``timeout_minutes`` bounds how long a
    rank waits for the others at a collective (a rank that died makes the rest fail after it, not hang).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with torchrun "
                           "(or accelerate launch), which sets all of " + ", ".join(LAUNCHER_ENV))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Context(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def shutdown(context: Context) -> None:
    """Leaves the process group (nothing to do for a single process)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardedPairData(PairData):
    """``PairData`` whose statistics stream over this rank's share of the views and are summed over ranks.

    Each rank reads only its share of the cached features for the closed-form fits; every rank ends with the
    statistics of all views, the numbers one process would have. ``key`` and ``tensors`` (the whole parts, for
    the trained maps) are ``PairData``'s, so a trained map's cache key does not depend on the number of ranks.
    """

    def __init__(self, context: Context, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = context

    def _summed(self, kind: str, part: str, stats: LinearStats) -> LinearStats:
        if (kind, part) not in self._stats:
            views = self.context.shard(self.views[part])
            for i in range(0, len(views), self.batch):
                stats.update(*self._load(views[i:i + self.batch]))
            self._stats[(kind, part)] = self.context.all_reduce_stats(stats)
        return self._stats[(kind, part)]

    def stats(self, part: str) -> LinearStats:
        return self._summed("shared", part, LinearStats(self.spec.channels, self.spec.channels))

    def position_stats(self, part: str) -> PositionStats:
        spec = self.spec
        return self._summed("position", part, PositionStats(spec.channels, spec.channels, spec.height * spec.width))


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
    parts = {part: split.views(part, config.train_views) for part in ("train", "val", "test")}
    views = parts["train"] + parts["val"] + parts["test"]
    t0 = time.perf_counter()
    plain = [m for m in manipulations if not isinstance(m, SplitEdit)]
    extracted = store.ensure(context.shard(views), [None] + plain)
    for edit in manipulations:  # a semantic edit runs on the views its object masks allow
        if isinstance(edit, SplitEdit):
            usable = [v for part in ("train", "val", "test") for v in edit.usable[part]]
            extracted += store.ensure(context.shard(usable), [edit])
    extract_local = time.perf_counter() - t0
    context.barrier()
    extract_wall = time.perf_counter() - t0
    options = map_options(config, progress=context.is_main)
    fits, trained, times = {}, [], {"stats_seconds": 0.0, "closed_form_seconds": 0.0, "train_seconds": 0.0}
    for manip in manipulations:
        fit_views = {part: views_of(manip, parts)[part] for part in ("train", "val")}
        for layer in store.backbone.layers:
            for spatial in spatial_modes(manip, config):
                data = ShardedPairData(context, store, fit_views, manip, layer, spatial, config.batch_size)
                t1 = time.perf_counter()
                data.stats("train"), data.stats("val")  # one sharded pass, shared by the closed-form maps
                times["stats_seconds"] += time.perf_counter() - t1
                for cls in maps_to_fit(config, manip, layer, spatial):
                    name = cls.name
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
                        fits[f"{manip.name}/{layer}/{spatial}/{name}"] = state | mapping.extra_metrics()
    per_rank = context.gather({"rank": context.rank, "views": len(context.shard(views)), "images": extracted,
                               "cache_writes": store.cache.writes, "extract_seconds": extract_local})
    return {"chapter": config.chapter, "world_size": context.world_size, "backend": context.backend,
            "photos": len(images), "views": len(views), "manipulations": len(manipulations),
            "images_extracted": sum(r["images"] for r in per_rank), "per_rank": per_rank,
            "extract_seconds": extract_wall, **times, "fit_seconds": times["stats_seconds"] +
            times["closed_form_seconds"], "total_seconds": time.perf_counter() - start,
            "closed_form_fits": len(fits), "trained_maps": trained, "fits": fits}
