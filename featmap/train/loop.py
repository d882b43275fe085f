"""The one training loop of every trained network, the learned maps' and the inverter's: seeded, resumable,
the same code on the CPU or CUDA, in one process or data parallel (a strategy passed in: ``featmap.train.strategy``).

``fit`` trains a network on ``Pairs`` by a ``Recipe``: the loss, the optimizer's settings, the schedule (plateau on
the validation loss, or cosine over a fixed budget), how long to train, when to validate and which weights to keep
(``Stopping``: budgets in optimizer steps or epochs), and the random streams. ``train_map`` is the learned maps'
recipe (the reference protocol's, in steps) on normalised features.
"""
from __future__ import annotations

import math
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
    """Training settings of the learned maps, budgets in optimizer steps; the defaults are the reference protocol's
    (section 4) turned into steps at its data size (7,600 training pairs, 64 a step: about 119 steps an epoch):
    validation every 119 steps, a cap of 100 epochs, early stopping after 6 epochs and the plateau after 8.

    ``max_epochs`` is an alias cap in passes over the training pairs (None: only ``max_steps``); training ends at
    the first cap reached or when the validation loss has not improved (by ``min_delta``, relative) for
    ``patience`` steps. The learning rate is halved (``plateau_factor``) at the first validation at least
    ``plateau_steps`` steps after the last improvement, down to ``min_lr``.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_steps: int = 11900
    patience: int = 714
    eval_every: int = 119
    plateau_steps: int = 952
    min_delta: float = 1e-3
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    mse_weight: float = 0.3
    cos_weight: float = 0.7
    seed: int = 0
    max_epochs: int | None = None

    def __post_init__(self):
        for name, low, high in (("lr", 1e-8, 1.0), ("weight_decay", 0.0, 10.0), ("batch_size", 2, 65536),
                                ("max_steps", 0, 10_000_000), ("eval_every", 1, 10_000_000),
                                ("patience", 1, 10_000_000), ("plateau_steps", 1, 10_000_000),
                                ("min_delta", 0.0, 0.5), ("plateau_factor", 1e-3, 1.0), ("min_lr", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"training {name} must be a number in [{low}, {high}], got {value!r}")
        if self.max_epochs is not None and (isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int)
                                            or self.max_epochs < 1):
            raise ValueError(f"training max_epochs must be None or an integer >= 1, got {self.max_epochs!r}")
        if self.patience < self.eval_every or self.plateau_steps < self.eval_every:
            raise ValueError(f"training patience ({self.patience}) and plateau_steps ({self.plateau_steps}) must be at "
                             f"least eval_every ({self.eval_every}): the validation loss is read that often")


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
    """The learning rate times ``factor`` after more than ``patience`` validations in a row without a lower
    validation loss, down to ``min_lr``; steered by the validation loss."""

    patience: int
    factor: float
    min_lr: float
    threshold: float = 1e-4  # relative: a validation loss counts as lower below best * (1 - threshold)
    needs_validation = True

    def build(self, opt: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=self.patience,
                                                          factor=self.factor, min_lr=self.min_lr,
                                                          threshold=self.threshold)

    def step(self, scheduler, val_loss: float | None) -> None:
        scheduler.step(val_loss)


@dataclass(frozen=True)
class Cosine:
    """The learning rate cosine-annealed to zero over a fixed budget of ``epochs`` rounds (epochs when a round is an
    epoch); blind to validation."""

    epochs: int
    needs_validation = False

    def build(self, opt: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)

    def step(self, scheduler, val_loss: float | None) -> None:
        scheduler.step()


@dataclass(frozen=True)
class Stopping:
    """How long to train, when to read the validation loss, and which weights to return.

    Training runs in rounds: ``eval_every`` optimizer steps (None: the rest of the current epoch), each followed by
    the validation loss, a schedule step and the stopping rule. It ends at the first of ``max_steps`` steps,
    ``max_epochs`` passes over the training pairs, or ``patience`` steps since the last improvement (an improvement
    lowers the best validation loss by more than ``min_delta`` times it).
    """

    max_epochs: int | None = None
    max_steps: int | None = None
    patience: int | None = None     # steps without improving before stopping; None: run to the cap
    min_delta: float = 0.0          # relative: an improvement is a validation loss below best - min_delta * |best|
    keep_best: bool = False         # return the weights of the best validation round instead of the last ones
    eval_every: int | None = None   # steps a round; None: a round is the rest of an epoch
    eval_at_start: bool = False     # read the validation loss before the first step (so step 0 can be the best)

    def __post_init__(self):
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("training needs a cap: max_epochs or max_steps")

    @property
    def needs_validation(self) -> bool:
        return self.patience is not None or self.keep_best or self.eval_at_start

    def capped(self, state: dict) -> bool:
        """Returns whether the state has reached a cap (steps or epochs)."""
        return ((self.max_steps is not None and state["step"] >= self.max_steps)
                or (self.max_epochs is not None and state["epoch"] >= self.max_epochs))

    def patience_out(self, state: dict) -> bool:
        """Returns whether the validation loss has not improved for ``patience`` steps."""
        return (self.patience is not None and state["best_step"] >= 0
                and state["step"] - state["best_step"] >= self.patience)

    def running(self, state: dict) -> bool:
        """Returns whether another round runs after those recorded in ``state``."""
        return not self.capped(state) and not self.patience_out(state)


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
    dropout_stream: str | None = "dropout"  # torch's global seed per round, for dropout; None: left alone
    min_batch: int = 1                      # smaller batches are skipped (batch norm needs two samples)
    metrics: Mapping[str, Callable] = field(default_factory=dict)  # per-sample validation scores, recorded
    # mixed precision: the training forward pass under torch.autocast to this dtype (weights, gradients, the
    # optimizer, the loss and validation stay float32); None: float32 throughout
    autocast: torch.dtype | None = None
    # a term of the parameters added to the training loss (a prior); validation and train_loss read ``loss`` alone
    penalty: Callable[[nn.Module], torch.Tensor] | None = None


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
    """A trained network and its run: ``history`` holds one record per round (``step``, ``epoch``, ``lr``,
    ``train_loss``: the mean over the round's training batches in training mode, and ``val_loss`` and
    ``val_<metric>`` when there is validation data; a record at step 0 before any training, without a training
    loss, when asked).
    ``best_step`` is the step of the returned weights when ``keep_best`` (-1 without validation), ``stopped_early``
    whether the patience ran out before a cap, ``resumed_epoch`` the epoch a checkpoint held (0 for a fresh run),
    ``resumed_from`` the step the run started at (0, or the steps a
    checkpoint held)."""

    net: nn.Module
    steps: int
    epochs: int
    history: list[dict]
    best_val_loss: float
    best_step: int
    stopped_early: bool
    seconds: float
    resumed_from: int
    resumed_epoch: int = 0


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
    return {"epoch": 0, "step": 0, "pos": 0, "round": 0, "best_val": float("inf"), "best_step": -1, "seconds": 0.0,
            "history": []}


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


def _order(recipe: Recipe, n: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(recipe.seed, recipe.shuffle_stream,
                                                                                  epoch)))


def _fit(net: nn.Module, recipe: Recipe, train: Pairs, val: Pairs | None, device: torch.device | str,
         strategy: Strategy, checkpoint: Path | None, progress: bool, desc: str, every: float) -> Fitted:
    """``fit``'s loop.

    Epochs draw their order of the training pairs from (seed, epoch); batches of ``recipe.batch_size`` run through
    it (a remainder under ``min_batch`` skipped), one optimizer step each. Rounds (``Stopping.eval_every`` steps, or
    the rest of an epoch) draw their dropout from (seed, round) and end with the validation scores, a schedule step
    and the stopping rule. ``checkpoint``: a file written atomically after a round once ``every`` seconds have passed
    since the start or the last one (0: after every round); an interrupted run resumes from it and ends as an
    uninterrupted one would (an unreadable file is deleted and the run starts over). Which rounds are written
    depends on the clock; what a resumed run computes does not.
    ``strategy``: where processes differ (``featmap.train.strategy``); the loop itself is the same.
    """
    device = torch.device(device)
    stop = recipe.stopping
    if len(train) == 0 or (val is not None and len(val) == 0):
        raise ValueError(f"training needs training and validation pairs, got {len(train)} and "
                         f"{len(val) if val is not None else 'no validation'}")
    if val is None and (recipe.schedule.needs_validation or stop.needs_validation):
        raise ValueError(f"{recipe.schedule} or {stop} needs a validation loss; pass validation pairs")
    strategy.check(len(train))
    net = strategy.prepare(net.to(device), device)
    opt = recipe.optimizer.build(net.parameters())
    scheduler = recipe.schedule.build(opt)
    state = _fresh_state()
    best = _snapshot(net) if stop.keep_best else None
    saved = strategy.from_main(lambda: read_cached(checkpoint, _read_checkpoint) if checkpoint is not None else None)
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        scheduler.load_state_dict(saved["sched"])
        best, state = saved["best"], saved["state"]
    resumed_from, resumed_epoch = state["step"], state["epoch"]
    model = strategy.wrap(net, device)
    smallest = max(recipe.min_batch, strategy.world_size)
    total = stop.max_steps if stop.max_steps is not None else stop.max_epochs
    bar = progress_bar(total=total, initial=state["step"] if stop.max_steps is not None else state["epoch"],
                       desc=desc, unit="step" if stop.max_steps is not None else "epoch", disable=not progress)
    order = _order(recipe, len(train), state["epoch"])

    def validate(record: dict) -> float | None:
        if val is None:
            return None
        scores = strategy.agree(_evaluate(net, val, recipe.loss, recipe.metrics, recipe.batch_size, device))
        record.update({f"val_{name}": value for name, value in scores.items()})
        best_val = state["best_val"]
        if scores["loss"] < (best_val - stop.min_delta * abs(best_val) if math.isfinite(best_val) else best_val):
            state.update(best_val=scores["loss"], best_step=state["step"])
            if stop.keep_best:
                nonlocal best
                best = _snapshot(net)
        return scores["loss"]

    if stop.eval_at_start and not state["history"]:
        record = {"step": 0, "epoch": 0, "lr": opt.param_groups[0]["lr"]}  # nothing trained yet: no training loss
        # the schedule counts from this reading too: a plateau is measured from the last improvement, step 0 included
        recipe.schedule.step(scheduler, validate(record))
        state["history"].append(record)
    written = time.perf_counter()
    while stop.running(state):
        start = time.perf_counter()
        net.train()
        # Every draw is seeded from (seed, round) or (seed, epoch): a resumed run draws what it would have drawn.
        if recipe.dropout_stream is not None:
            torch.manual_seed(derive_seed(recipe.seed, recipe.dropout_stream, state["round"],
                                          *strategy.dropout_key()))
        loss_sum, seen, steps_before, epoch_before = 0.0, 0, state["step"], state["epoch"]
        while not stop.capped(state) and (state["step"] - steps_before < stop.eval_every if stop.eval_every
                                          else state["epoch"] == epoch_before):
            idx = order[state["pos"]:state["pos"] + recipe.batch_size]
            state["pos"] += recipe.batch_size
            if state["pos"] >= len(order):
                state["epoch"], state["pos"] = state["epoch"] + 1, 0
                order = _order(recipe, len(train), state["epoch"])
            if len(idx) < smallest and len(train) > 1:
                continue  # a single-sample batch breaks batch norm (and every process needs a sample)
            mine = strategy.share(idx)
            x, target = train.batch(mine, device)
            if recipe.autocast is None:
                loss = recipe.loss(model(x), target)
            else:
                with torch.autocast(device.type, dtype=recipe.autocast):
                    out = model(x)
                loss = recipe.loss(out.float(), target)
            objective = loss if recipe.penalty is None else loss + recipe.penalty(net)
            opt.zero_grad(set_to_none=True)
            strategy.weight(objective, mine, idx).backward()
            opt.step()
            state["step"] += 1
            loss_sum, seen = loss_sum + loss.item() * len(mine), seen + len(mine)
        strategy.end_round(net)
        record = {"step": state["step"], "epoch": state["epoch"], "lr": opt.param_groups[0]["lr"],
                  "train_loss": loss_sum / seen if seen else float("nan")}
        recipe.schedule.step(scheduler, validate(record))
        state["history"].append(record)
        state["round"] += 1
        state["seconds"] += time.perf_counter() - start
        if checkpoint is not None and strategy.writes and time.perf_counter() - written >= every:
            blob = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "best": best,
                    "state": state}
            write_cached(checkpoint, _save, blob)
            written = time.perf_counter()
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("train_loss", "val_loss")})
        bar.update(state["step"] - steps_before if stop.max_steps is not None else state["epoch"] - epoch_before)
    bar.close()
    if best is not None:
        net.load_state_dict(best)
    return Fitted(net, state["step"], state["epoch"], state["history"], state["best_val"], state["best_step"],
                  stop.patience_out(state) and val is not None, state["seconds"], resumed_from, resumed_epoch)


def map_recipe(cfg: TrainConfig, penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> Recipe:
    """Returns the learned maps' recipe: the reference loss (plus ``penalty``, a prior on the parameters), AdamW,
    the learning rate lowered after ``plateau_steps`` steps without a better validation loss, validation every
    ``eval_every`` steps from step 0 on, early stopping after ``patience`` steps, the best validation round's weights,
    dropout seeded per round, single-sample batches skipped."""
    return Recipe(loss=partial(reference_loss, mse_weight=cfg.mse_weight, cos_weight=cfg.cos_weight),
                  optimizer=AdamW(cfg.lr, cfg.weight_decay),
                  # torch's plateau lowers the rate after ``patience + 1`` bad validations in a row: the first reading
                  # at least ``plateau_steps`` steps after the last improvement (rounding down halved the rate early:
                  # after 40 steps for 50 read every 20, which stopped a slowly learning map long before its best)
                  schedule=Plateau(max(math.ceil(cfg.plateau_steps / cfg.eval_every) - 1, 0), cfg.plateau_factor,
                                   cfg.min_lr, threshold=cfg.min_delta),
                  stopping=Stopping(max_epochs=cfg.max_epochs, max_steps=cfg.max_steps, patience=cfg.patience,
                                    min_delta=cfg.min_delta, keep_best=True, eval_every=cfg.eval_every,
                                    eval_at_start=True),
                  batch_size=cfg.batch_size, seed=cfg.seed, min_batch=2, penalty=penalty)


def map_losses(predict: Callable[[torch.Tensor], torch.Tensor], normalizer: Normalizer,
               parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
               batch_size: int = 256) -> dict[str, float]:
    """Returns {part: the learned maps' objective}: the reference loss (``cfg``'s weights, no penalty) of ``predict``
    (raw features in, raw features out, in eval mode) on each part's (x, y) pairs, normalised by ``normalizer`` as the
    trained maps see them; the same number for a closed-form map and a trained one."""
    loss = partial(reference_loss, mse_weight=cfg.mse_weight, cos_weight=cfg.cos_weight)
    out = {}
    with torch.no_grad():
        for part, (x, y) in parts.items():
            total = 0.0
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                total += float(loss(normalizer(predict(xb)), normalizer(yb))) * len(xb)
            out[part] = total / len(x)
    return out


def train_map(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None, progress: bool = True,
              desc: str = "training", context: Context | None = None, normalizer: Normalizer | None = None,
              penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> tuple[NormalizedMap, dict]:
    """Returns the trained map (the best validation round's weights, on the CPU) and its run's facts.

    Trained by ``fit`` with ``map_recipe(cfg, penalty)`` on features normalised per channel by ``normalizer``
    (None: fitted on the training inputs). Facts: ``steps`` run, ``best_step`` (the kept weights' step; 0 is the
    starting point), ``stopped_early`` (the patience ran out before the cap), ``train_loss`` and ``best_val_loss``
    (the objective without the penalty, at the kept weights, on the training and validation pairs), ``seconds``,
    ``history`` (per round: step, lr, training and validation loss). ``checkpoint``: a file written atomically as
    ``fit`` does; an interrupted run resumes from it. ``context``: a distributed context
    (``featmap.core.distributed``); with more than one rank, the loop runs under ``DataParallel`` (every rank holds
    all pairs and trains on its share of each batch; rank 0 writes the checkpoint and its validation loss drives
    the schedule on every rank).
    """
    (x_train, y_train), (x_val, y_val) = train, val
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training needs training and validation pairs, got {len(x_train)} and {len(x_val)}")
    normalizer = Normalizer.fit(x_train) if normalizer is None else normalizer
    run = fit(net, map_recipe(cfg, penalty), Pairs(normalizer(x_train), normalizer(y_train)),
              Pairs(normalizer(x_val), normalizer(y_val)), device, strategy_for(context), checkpoint, progress, desc)
    trained = NormalizedMap(run.net.cpu().eval(), normalizer)
    losses = map_losses(trained, normalizer, {"train": train, "val": val}, cfg)
    history = [{k: r[k] for k in ("step", "lr", "train_loss", "val_loss") if k in r} for r in run.history]
    return trained, {"steps": run.steps, "epochs": run.epochs, "best_step": run.best_step,
                     "stopped_early": run.stopped_early, "train_loss": losses["train"],
                     "best_val_loss": losses["val"], "seconds": run.seconds, "history": history,
                     "config": asdict(cfg)}
