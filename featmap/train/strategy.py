"""Where the training loop runs: one process (``SingleProcess``) or data parallel over ranks (``DataParallel``).

The loop (``featmap.train.loop.fit``) asks its strategy at each point where processes differ: how to wrap the
model, which share of a batch this process computes and how its loss is weighted, what to synchronise after an
round of steps, whose validation loss counts, who writes the checkpoint and what every process resumes from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from featmap.core.distributed import Context
from featmap.core.io import cached, read_cached, write_cached

T = TypeVar("T")


class Strategy:
    """The hooks the training loop calls where processes differ; as defined here, those of one process alone:
    every hook hands its input back, and this process reads and writes."""

    world_size = 1
    writes = True  # this process writes the checkpoint and the cache entries

    def check(self, n_train: int) -> None:
        """Raises when ``n_train`` training pairs cannot be shared among the processes (never, alone)."""

    def prepare(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Returns the network the loop trains and returns (before the optimizer sees its parameters)."""
        return net

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Returns the module a training step calls (sharing ``net``'s parameters)."""
        return net

    def dropout_key(self) -> tuple:
        """Returns what besides (seed, epoch) seeds this process's dropout masks."""
        return ()

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        """Returns this process's share of a batch's sample indices."""
        return idx

    def weight(self, loss: torch.Tensor, mine: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Returns the loss of this process's share ``mine`` of ``batch`` as its gradients should count."""
        return loss

    def end_round(self, net: nn.Module) -> None:
        """Synchronises what the optimizer does not (buffers) after a round's steps, before validation."""

    def agree(self, value: T) -> T:
        """Returns the value every process uses (rank 0's) for ``value`` computed by each."""
        return value

    def from_main(self, read: Callable[[], T]) -> T:
        """Returns ``read()`` called by the process that reads shared files, on every process."""
        return read()

    def cached(self, path: Path, load, compute, save):
        """Returns ``core.io.cached(path, load, compute, save)`` with ``compute`` run by every process when the
        entry is missing (a training run they share)."""
        return cached(path, load, compute, save)


class SingleProcess(Strategy):
    """Training in this process alone."""


class DataParallel(Strategy):
    """Data parallel over the ranks of ``context`` (torch.distributed, DistributedDataParallel).

    Every rank holds all pairs and draws the same seeded batches; each computes its round-robin share of a batch,
    with its loss weighted by its share so that DDP's average over ranks is the whole batch's gradient. Batch-norm
    buffers are rank 0's after every round (SyncBatchNorm on CUDA), rank 0's validation loss steers every rank,
    rank 0 reads and writes checkpoints and cache entries, and every rank resumes from what rank 0 read.
    """

    def __init__(self, context: Context):
        self.context = context
        self.world_size = context.world_size
        self.writes = context.is_main

    def check(self, n_train: int) -> None:
        if n_train < self.world_size:
            raise ValueError(f"{n_train} training pairs cannot be shared by {self.world_size} processes")

    def prepare(self, net: nn.Module, device: torch.device) -> nn.Module:
        return self.context.sync_batchnorm(net, device)

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        return self.context.wrap(net, device)

    def dropout_key(self) -> tuple:
        # Equal seeds would give every rank's i-th sample the same dropout mask.
        return (self.context.rank,)

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        return self.context.shard(idx)

    def weight(self, loss: torch.Tensor, mine: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        # The loss is a mean over this rank's samples and DDP averages over ranks: weight by this rank's share.
        return loss * (len(mine) * self.world_size / len(batch))

    def end_round(self, net: nn.Module) -> None:
        self.context.sync_buffers(net)

    def agree(self, value: T) -> T:
        return self.context.broadcast(value)

    def from_main(self, read: Callable[[], T]) -> T:
        # No shared filesystem needed: rank 0 reads, every rank gets what it read (or None).
        return self.context.broadcast(read() if self.context.is_main else None)

    def cached(self, path: Path, load, compute, save):
        """Returns rank 0's entry at ``path`` on every rank; on a miss every rank computes, rank 0's result is
        everyone's (its batch-norm buffers; parameters agree already) and rank 0 writes it."""
        value = self.from_main(lambda: read_cached(path, load))
        if value is None:
            value = self.agree(compute())
            if self.writes:
                write_cached(path, save, value)
        return value


def strategy_for(context: Context | None) -> Strategy:
    """Returns ``DataParallel(context)`` for a context of more than one process, else ``SingleProcess()``."""
    return DataParallel(context) if context is not None and context.distributed else SingleProcess()
