"""One training loop for every learned map: the reference loss, AdamW, plateau and early stopping,
per-channel normalisation, seeded, resumable, CUDA when available with the same code path."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from featmap.core.io import atomic_write
from featmap.core.seeding import derive_seed
from featmap.train.normalizer import NormalizedMap, Normalizer

if TYPE_CHECKING:
    from featmap.core.distributed import Context


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the reference protocol's (section 4), except ``max_epochs``."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 100
    early_stop_patience: int = 6
    early_stop_min_delta: float = 1e-3
    plateau_patience: int = 8
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    mse_weight: float = 0.3
    cos_weight: float = 0.7
    seed: int = 0

    def __post_init__(self):
        for name in ("lr", "batch_size", "max_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"training {name} must be > 0, got {getattr(self, name)}")


def reference_loss(pred: torch.Tensor, true: torch.Tensor, mse_weight: float = 0.3,
                   cos_weight: float = 0.7) -> torch.Tensor:
    """Returns mse_weight * MSE + cos_weight * (1 - mean over samples of the median over positions of cosine)."""
    mse = F.mse_loss(pred, true)
    cos = F.cosine_similarity(pred, true, dim=1, eps=1e-8).flatten(1)
    return mse_weight * mse + cos_weight * (1 - cos.median(dim=1).values.mean())


def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device) -> float:
    net.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), cfg.batch_size):
            xb, yb = x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device)
            total += float(reference_loss(net(xb), yb, cfg.mse_weight, cfg.cos_weight)) * len(xb)
    return total / len(x)


def train_map(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None, progress: bool = True,
              desc: str = "training", context: Context | None = None) -> tuple[NormalizedMap, dict]:
    """Returns the trained map (best validation epoch, on the CPU) and its history.

    ``checkpoint``: a file written atomically after every epoch; an interrupted run resumes from it.
    ``context``: a distributed context (``featmap.distributed``); with more than one rank every rank holds all
    pairs and the same seeded batches, takes its share of each batch and trains under DistributedDataParallel,
    with its loss weighted by its share so the averaged gradient is the whole batch's. Rank 0 writes the
    checkpoint and its validation loss drives the schedule on every rank.
    """
    ddp = context is not None and context.distributed
    x_train, y_train = train
    x_val, y_val = val
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training needs training and validation pairs, got {len(x_train)} and {len(x_val)}")
    if ddp and len(x_train) < context.world_size:
        raise ValueError(f"{len(x_train)} training pairs cannot be shared by {context.world_size} processes")
    normalizer = Normalizer.fit(x_train)
    zx, zy = normalizer(x_train), normalizer(y_train)
    vx, vy = normalizer(x_val), normalizer(y_val)
    net = net.to(device)
    if ddp:
        net = context.sync_batchnorm(net, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=cfg.plateau_patience,
                                                         factor=cfg.plateau_factor, min_lr=cfg.min_lr)
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0, "seconds": 0.0,
             "history": []}
    best_weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    saved = None
    if checkpoint is not None and checkpoint.is_file():
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception:  # torn, foreign or carrying code: never trusted; this run trains from scratch
            checkpoint.unlink(missing_ok=True)
    if ddp:  # every rank resumes from rank 0's checkpoint, or none does (no shared filesystem needed)
        saved = context.broadcast(saved if context.is_main else None)
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        plateau.load_state_dict(saved["plateau"])
        best_weights = saved["best_weights"]
        state = saved["state"]
    model = context.wrap(net, device) if ddp else net
    world = context.world_size if ddp else 1
    bar = tqdm(total=cfg.max_epochs, initial=state["epoch"], desc=desc, unit="epoch", file=sys.stderr,
               disable=not progress, leave=False)
    while state["epoch"] < cfg.max_epochs and state["bad_epochs"] < cfg.early_stop_patience:
        start = time.perf_counter()
        net.train()
        # One generator per epoch, seeded from (seed, epoch): a resumed run draws what it would have drawn.
        # Dropout masks also depend on the rank: equal seeds would give every rank's i-th sample the same mask.
        torch.manual_seed(derive_seed(cfg.seed, "dropout", state["epoch"], *([context.rank] if ddp else [])))
        order = torch.randperm(len(zx), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, "shuffle", state["epoch"])))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if len(idx) < max(2, world) and len(order) > 1:
                continue  # a single-sample batch breaks batch norm (and a rank needs one); skip the remainder
            mine = context.shard(idx) if ddp else idx
            loss = reference_loss(model(zx[mine].to(device)), zy[mine].to(device), cfg.mse_weight, cfg.cos_weight)
            if ddp:  # the loss is a mean over samples; DDP averages over ranks: weight by this rank's share
                loss = loss * (len(mine) * world / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ddp:
            context.sync_buffers(net)
        val_loss = _evaluate(net, vx, vy, cfg, device)
        if ddp:
            val_loss = context.broadcast(val_loss)
        plateau.step(val_loss)
        if val_loss < state["best_val"] - cfg.early_stop_min_delta:
            state.update(best_val=val_loss, best_epoch=state["epoch"], bad_epochs=0)
            best_weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["history"].append(val_loss)
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - start
        if checkpoint is not None and (not ddp or context.is_main):
            blob = {"net": net.state_dict(), "opt": opt.state_dict(), "plateau": plateau.state_dict(),
                    "best_weights": best_weights, "state": state}
            atomic_write(checkpoint, lambda f: torch.save(blob, f))
        bar.set_postfix(val_loss=f"{val_loss:.4f}", best=f"{state['best_val']:.4f}")
        bar.update(1)
    bar.close()
    net.load_state_dict(best_weights)
    trained = NormalizedMap(net.cpu().eval(), normalizer)
    return trained, {"epochs": state["epoch"], "best_epoch": state["best_epoch"], "best_val_loss": state["best_val"],
                     "seconds": state["seconds"], "history": state["history"], "config": asdict(cfg)}
