"""The one training loop of every trained network, the learned maps' and the inverter's: seeded, resumable,
the same code on the CPU or CUDA, in one process or data parallel (a strategy passed in: ``featmap.train.strategy``).

``fit`` trains a network on ``Pairs`` by a ``Recipe``: the loss, the optimizer's settings, the schedule (plateau on
the validation loss, or cosine over a fixed budget), when to stop and which weights to keep (``Stopping``), and the
per-epoch random streams. ``train_map`` is the learned maps' recipe (the reference protocol) on normalised features.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from featmap.core.device import overridden
from featmap.core.io import read_cached, write_cached
from featmap.core.progress import bar as progress_bar
from featmap.core.seeding import derive_seed
from featmap.train.normalizer import NormalizedMap, Normalizer
from featmap.train.strategy import SingleProcess, Strategy, strategy_for

if TYPE_CHECKING:
    from featmap.core.distributed import Context

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction, target) -> mean over the samples

# A run's state is checkpointed after an epoch once this many seconds have passed since the run started or last wrote
# one: an interruption loses at most about this much training. After every epoch instead, the book's trained maps
# (10 epochs of a few seconds each, 135 maps) wrote about 1,350 checkpoints of 2 to 12 MB: 13 ms each for a small
# transformer map on this CPU, and gigabytes of writes. 0: after every epoch.
CHECKPOINT_SECONDS = 30.0


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


def channel_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Returns the cosine between a's and b's channel vectors (dim 1) at every position: a.b / max(|a| |b|, eps).

    ``F.cosine_similarity`` up to rounding (it clamps each norm at ``eps`` instead of their product), in three
    reductions: measured on one CPU thread, forward and backward of (64, 320, 7, 7) maps 11.4 -> 2.7 ms. The loss
    runs it at every training step, and the scores' cosines (``featmap.score.metrics``) in float64."""
    return (a * b).sum(1) / (a.pow(2).sum(1) * b.pow(2).sum(1)).clamp_min(eps * eps).sqrt()


def reference_loss(pred: torch.Tensor, true: torch.Tensor, mse_weight: float = 0.3,
                   cos_weight: float = 0.7) -> torch.Tensor:
    """Returns mse_weight * MSE + cos_weight * (1 - mean over samples of the median over positions of cosine)."""
    mse = F.mse_loss(pred, true)
    cos = channel_cosine(pred, true).flatten(1)
    return mse_weight * mse + cos_weight * (1 - cos.median(dim=1).values.mean())


@dataclass(frozen=True)
class AdamW:
    """The optimizer: AdamW with this learning rate and (decoupled) weight decay."""

    lr: float
    weight_decay: float

    def build(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Plateau:
    """The learning rate times ``factor`` after ``patience`` epochs without a lower validation loss, down to
    ``min_lr``; steered by the validation loss."""

    patience: int
    factor: float
    min_lr: float
    needs_validation = True

    def build(self, opt: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=self.patience,
                                                          factor=self.factor, min_lr=self.min_lr)

    def step(self, scheduler, val_loss: float | None) -> None:
        scheduler.step(val_loss)


@dataclass(frozen=True)
class Cosine:
    """The learning rate cosine-annealed to zero over a fixed budget of ``epochs``; blind to validation."""

    epochs: int
    needs_validation = False

    def build(self, opt: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)

    def step(self, scheduler, val_loss: float | None) -> None:
        scheduler.step()


@dataclass(frozen=True)
class Stopping:
    """How long to train and which weights to return."""

    max_epochs: int
    patience: int | None = None  # stop after this many epochs in a row without improving; None: run max_epochs
    min_delta: float = 0.0       # an improvement lowers the best validation loss by more than this
    keep_best: bool = False      # return the weights of the best validation epoch instead of the last ones

    @property
    def needs_validation(self) -> bool:
        return self.patience is not None or self.keep_best

    def running(self, state: dict) -> bool:
        """Returns whether another epoch runs after those recorded in ``state``."""
        return state["epoch"] < self.max_epochs and (self.patience is None or state["bad_epochs"] < self.patience)


@dataclass(frozen=True)
class Recipe:
    """What the loop does with the data: every setting besides the data, the device and the strategy."""

    loss: Loss
    optimizer: AdamW
    schedule: Plateau | Cosine
    stopping: Stopping
    batch_size: int
    seed: int
    shuffle_stream: str = "shuffle"         # the epoch's shuffle is seeded from (seed, shuffle_stream, epoch)
    dropout_stream: str | None = "dropout"  # torch's global seed per epoch, for dropout; None: left alone
    min_batch: int = 1                      # smaller batches are skipped (batch norm needs two samples)
    metrics: Mapping[str, Callable] = field(default_factory=dict)  # per-sample validation scores, recorded
    # mixed precision: the training forward pass under torch.autocast to this dtype (weights, gradients, the
    # optimizer, the loss and validation stay float32); None: float32 throughout
    autocast: torch.dtype | None = None


def _unchanged(y: torch.Tensor) -> torch.Tensor:
    return y


@dataclass(frozen=True, eq=False)
class Pairs:
    """Inputs ``x`` and targets ``y`` (both (N, ...)); ``target`` turns a batch of ``y`` on the device into what
    the loss compares the network's output with (uint8 images to [0, 1] floats, say)."""

    x: torch.Tensor
    y: torch.Tensor
    target: Callable[[torch.Tensor], torch.Tensor] = _unchanged

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (inputs, targets) of the samples ``idx`` (indices or a slice) on ``device``."""
        return self.x[idx].to(device), self.target(self.y[idx].to(device))


@dataclass
class Fitted:
    """A trained network and its run: ``history`` holds one record per epoch (``train_loss``, the mean over this
    process's training samples, and ``val_loss`` and ``val_<metric>`` when there is validation data);
    ``resumed_from`` is the epoch the run started at (0, or the epochs a checkpoint held)."""

    net: nn.Module
    epochs: int
    history: list[dict]
    best_val_loss: float
    best_epoch: int
    seconds: float
    resumed_from: int


def _evaluate(net: nn.Module, data: Pairs, loss: Loss, metrics: Mapping[str, Callable], batch_size: int,
              device: torch.device) -> dict[str, float]:
    """Returns {"loss": mean loss, metric: mean per-sample score} of ``net`` in eval mode over ``data``."""
    net.eval()
    total, sums = 0.0, dict.fromkeys(metrics, 0.0)
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, target = data.batch(slice(i, i + batch_size), device)
            pred = net(x)
            total += loss(pred, target).item() * len(pred)
            for name, metric in metrics.items():
                sums[name] += metric(pred, target).sum().item()
    return {"loss": total / len(data), **{name: s / len(data) for name, s in sums.items()}}


def _fresh_state() -> dict:
    return {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0, "seconds": 0.0, "history": []}


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _save(f, value) -> None:
    torch.save(value, f)


def _read_checkpoint(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if set(saved) != {"net", "opt", "sched", "best", "state"} or set(saved["state"]) != set(_fresh_state()):
        raise ValueError(f"{path} is not a checkpoint of this training loop")
    return saved


def fit(net: nn.Module, recipe: Recipe, train: Pairs, val: Pairs | None = None, device: torch.device | str = "cpu",
        strategy: Strategy = SingleProcess(), checkpoint: Path | None = None, progress: bool = True,
        desc: str = "training", checkpoint_every: float | None = None) -> Fitted:
    """Returns ``net`` trained on ``train`` by ``recipe`` (its last or best-validation weights), and its run.

    ``checkpoint_every``: the seconds between checkpoints (None: ``CHECKPOINT_SECONDS``, read at the call).

    On a GPU, cuDNN runs deterministic convolution algorithms during the fit: with its default choice two seeded
    fits of the cnn map differed by up to 0.2 in their predictions (measured on an H200, tests/test_cuda.py).
    """
    with overridden(torch.backends.cudnn, deterministic=True, benchmark=False):
        every = CHECKPOINT_SECONDS if checkpoint_every is None else float(checkpoint_every)
        if not every >= 0:  # NaN too: it would never write one
            raise ValueError(f"checkpoint_every must be seconds >= 0 (0: after every epoch), got {checkpoint_every!r}"
                             f" (CHECKPOINT_SECONDS is {CHECKPOINT_SECONDS!r})")
        return _fit(net, recipe, train, val, device, strategy, checkpoint, progress, desc, every)


def _fit(net: nn.Module, recipe: Recipe, train: Pairs, val: Pairs | None, device: torch.device | str,
         strategy: Strategy, checkpoint: Path | None, progress: bool, desc: str, every: float) -> Fitted:
    """``fit``'s loop.

    Each epoch: the training pairs in an order drawn from (seed, epoch), batches of ``recipe.batch_size`` (a
    remainder under ``min_batch`` skipped), one optimizer step each; then the validation scores, a schedule step,
    the stopping rule. ``checkpoint``: a file written atomically after an epoch once ``every`` seconds have passed
    since the start or the last one (0: after every epoch); an interrupted run resumes from it and ends as an
    uninterrupted one would (an unreadable file is deleted and the run starts over). Which epochs are written
    depends on the clock; what a resumed run computes does not.
    ``strategy``: where processes differ (``featmap.train.strategy``); the loop itself is the same.
    """
    device = torch.device(device)
    if len(train) == 0 or (val is not None and len(val) == 0):
        raise ValueError(f"training needs training and validation pairs, got {len(train)} and "
                         f"{len(val) if val is not None else 'no validation'}")
    if val is None and (recipe.schedule.needs_validation or recipe.stopping.needs_validation):
        raise ValueError(f"{recipe.schedule} or {recipe.stopping} needs a validation loss; pass validation pairs")
    strategy.check(len(train))
    net = strategy.prepare(net.to(device), device)
    opt = recipe.optimizer.build(net.parameters())
    scheduler = recipe.schedule.build(opt)
    state = _fresh_state()
    best = _snapshot(net) if recipe.stopping.keep_best else None
    saved = strategy.from_main(lambda: read_cached(checkpoint, _read_checkpoint) if checkpoint is not None else None)
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        scheduler.load_state_dict(saved["sched"])
        best, state = saved["best"], saved["state"]
    resumed_from = state["epoch"]
    model = strategy.wrap(net, device)
    smallest = max(recipe.min_batch, strategy.world_size)
    bar = progress_bar(total=recipe.stopping.max_epochs, initial=state["epoch"], desc=desc, unit="epoch",
                       disable=not progress)
    written = time.perf_counter()
    while recipe.stopping.running(state):
        start = time.perf_counter()
        net.train()
        # Every draw is seeded from (seed, epoch): a resumed run draws what it would have drawn.
        if recipe.dropout_stream is not None:
            torch.manual_seed(derive_seed(recipe.seed, recipe.dropout_stream, state["epoch"], *strategy.dropout_key()))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
            derive_seed(recipe.seed, recipe.shuffle_stream, state["epoch"])))
        total, seen = 0.0, 0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            if len(idx) < smallest and len(order) > 1:
                continue  # a single-sample batch breaks batch norm (and every process needs a sample)
            mine = strategy.share(idx)
            x, target = train.batch(mine, device)
            if recipe.autocast is None:
                loss = recipe.loss(model(x), target)
            else:
                with torch.autocast(device.type, dtype=recipe.autocast):
                    out = model(x)
                loss = recipe.loss(out.float(), target)
            opt.zero_grad(set_to_none=True)
            strategy.weight(loss, mine, idx).backward()
            opt.step()
            total, seen = total + loss.item() * len(mine), seen + len(mine)
        strategy.end_epoch(net)
        record = {"train_loss": total / seen if seen else float("nan")}
        val_loss = None
        if val is not None:
            scores = strategy.agree(_evaluate(net, val, recipe.loss, recipe.metrics, recipe.batch_size, device))
            record.update({f"val_{name}": value for name, value in scores.items()})
            val_loss = scores["loss"]
        recipe.schedule.step(scheduler, val_loss)
        if val_loss is not None and val_loss < state["best_val"] - recipe.stopping.min_delta:
            state.update(best_val=val_loss, best_epoch=state["epoch"], bad_epochs=0)
            if recipe.stopping.keep_best:
                best = _snapshot(net)
        elif val_loss is not None:
            state["bad_epochs"] += 1
        state["history"].append(record)
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - start
        if checkpoint is not None and strategy.writes and time.perf_counter() - written >= every:
            blob = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "best": best,
                    "state": state}
            write_cached(checkpoint, _save, blob)
            written = time.perf_counter()
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("train_loss", "val_loss")})
        bar.update(1)
    bar.close()
    if best is not None:
        net.load_state_dict(best)
    return Fitted(net, state["epoch"], state["history"], state["best_val"], state["best_epoch"], state["seconds"],
                  resumed_from)


def map_recipe(cfg: TrainConfig) -> Recipe:
    """Returns the learned maps' recipe: the reference loss, AdamW, plateau on the validation loss, early stopping,
    the best validation epoch's weights, dropout seeded per epoch, single-sample batches skipped."""
    return Recipe(loss=partial(reference_loss, mse_weight=cfg.mse_weight, cos_weight=cfg.cos_weight),
                  optimizer=AdamW(cfg.lr, cfg.weight_decay),
                  schedule=Plateau(cfg.plateau_patience, cfg.plateau_factor, cfg.min_lr),
                  stopping=Stopping(cfg.max_epochs, cfg.early_stop_patience, cfg.early_stop_min_delta, keep_best=True),
                  batch_size=cfg.batch_size, seed=cfg.seed, min_batch=2)


def train_map(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None, progress: bool = True,
              desc: str = "training", context: Context | None = None) -> tuple[NormalizedMap, dict]:
    """Returns the trained map (best validation epoch, on the CPU) and its history.

    Trained by ``fit`` with ``map_recipe(cfg)`` on features normalised per channel by the training inputs'
    statistics. ``checkpoint``: a file written atomically as ``fit`` does; an interrupted run resumes from it.
    ``context``: a distributed context (``featmap.core.distributed``); with more than one rank, the loop runs
    under ``DataParallel`` (every rank holds all pairs and trains on its share of each batch; rank 0 writes the
    checkpoint and its validation loss drives the schedule on every rank).
    """
    (x_train, y_train), (x_val, y_val) = train, val
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training needs training and validation pairs, got {len(x_train)} and {len(x_val)}")
    normalizer = Normalizer.fit(x_train)
    run = fit(net, map_recipe(cfg), Pairs(normalizer(x_train), normalizer(y_train)),
              Pairs(normalizer(x_val), normalizer(y_val)), device, strategy_for(context), checkpoint, progress, desc)
    trained = NormalizedMap(run.net.cpu().eval(), normalizer)
    return trained, {"epochs": run.epochs, "best_epoch": run.best_epoch, "best_val_loss": run.best_val_loss,
                     "seconds": run.seconds, "history": [r["val_loss"] for r in run.history], "config": asdict(cfg)}
