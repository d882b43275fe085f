"""Data-parallel context on torch.distributed (launched by ``torchrun`` or ``accelerate launch``).

A process started without a launcher gets the single-process context, in which every collective is a no-op:
the same code runs either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from featmap.core.device import resolve_device

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

    def all_reduce_stats(self, stats):
        """Returns ``stats`` (changed in place) with its sums ``xtx``, ``xty``, ``yty`` and count ``n`` summed over
        ranks: the statistics of every rank's positions.

        Sums stay float64 and the counts integers, so a fit equals a single process's to rounding.
        """
        if not self.distributed:
            return stats
        stats.xtx = self.all_reduce(stats.xtx)
        stats.xty = self.all_reduce(stats.xty)
        yty = self.all_reduce(torch.as_tensor(stats.yty, dtype=torch.float64))
        stats.yty = yty if torch.is_tensor(stats.yty) else float(yty)
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


