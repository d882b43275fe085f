"""Maps trained by gradient descent (the one loop, ``train.loop.train_map``), cached by content like features.

``linear_sgd`` (the shared 1x1 affine map, trained), ``mlp`` (per position, shared), ``cnn`` (two 3x3
convolutions: a 5x5 neighbourhood), ``transformer`` (global, tokens = positions, no positional encoding, as
the reference) and ``transformer_pe`` (the same with learned positional embeddings).

Where the non-linear maps start (``MapOptions.start``):

- ``linear`` (the default): the closed-form shared linear map's prediction (fit on the same training pairs, its
  ridge strength chosen on the same validation pairs, then frozen) plus a learned correction whose last layer starts
  at zero. Training begins exactly where the linear map ends, the validation loss is read before the first step, and
  the kept weights are those of the best validation round: a map whose ``best_step`` is 0 found nothing beyond the
  linear map that generalises to the validation photos, and its gain over linear is what its own view adds.
- ``identity``: x + f(x), f's last layer at zero: training begins at y = x.
- ``scratch``: the reference protocol's plain networks, from their random initialisation.

``linear_sgd`` is the same model as the closed-form ``linear``, trained by the loop: from ``scratch`` it is the
reference's randomly initialised 1x1 map; otherwise it starts at W = I, b = 0 and its training loss carries the
closed form's prior, the ridge penalty toward W = I at the strength the closed form chose on the validation photos
(in normalised coordinates: ``mse_weight * alpha / C * ||W - I||^2`` is the closed form's ``lambda ||W - I||^2``
on the loss's scale), so the two differ only in the objective's cosine part and in how they are solved.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from featmap.core.device import resolve_device
from featmap.core.io import content_key, default_cache_dir
from featmap.core.seeding import derive_seed
from featmap.maps.base import MAP_SIZES, MAPPINGS, START_POINTS, FitData, MapOptions, Mapping
from featmap.maps.closed_form import Linear
from featmap.train.loop import TrainConfig, map_losses, train_map
from featmap.train.normalizer import NormalizedMap, Normalizer
from featmap.train.strategy import strategy_for

if TYPE_CHECKING:
    from featmap.core.distributed import Context


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``: in training each element is kept with probability 1 - p and scaled by
    1 / (1 - p), else zeroed; in eval mode the identity.

    On the CPU the mask costs a quarter of torch's: four 16-bit uniform draws per 64-bit random word (torch draws
    one word per element), an element kept where its draw clears ``round(p * 65536) / 65536``, so p is that
    rounding (0.2 -> 0.199997) and 1 / (1 - p) scales exactly. Measured on one thread, (32, 49, 256) activations,
    forward and backward: 4.27 -> 1.78 ms; the transformers' and MLPs' steps spent 10 to 16% in torch's dropout.
    Draws come from torch's global generator, which the training loop seeds every epoch. Other devices keep torch's
    fused dropout."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)  # of 65536 equally likely draws, this many drop the element

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.threshold / 65536, True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold - 32768
        return x * keep.to(x.dtype).mul_(65536 / (65536 - self.threshold))

    def extra_repr(self) -> str:
        return f"p={self.threshold / 65536:g}"


DROPOUT = "featmap 16-bit mask"  # in a learned map's identity: which dropout drew its masks


class PerPosition(nn.Module):
    """Applies a (.., C) -> (.., C') module to every position's channel vector of a (B, C, H, W) map."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EncoderLayer(nn.TransformerEncoderLayer):
    """torch's post-LN encoder layer (batch first, no masks) whose self-attention runs in the batch-first layout.

    ``nn.MultiheadAttention`` moves batch-first tokens to sequence-first and back, and its packed in-projection
    zero-fills and copies (3, N, B, d) gradients in the backward pass: 13% of a training step at 49 tokens. Here
    the same parameters (``self_attn.in_proj_*``, ``out_proj``), the same kernel (``scaled_dot_product_attention``,
    dropout ``self_attn.dropout`` in training) and the same results (tested equal, outputs and gradients); the
    layer's evaluation fast path is torch's own. One thread, a training step at Lite0 blocks.6: 18% shorter."""

    def _sa_block(self, x: torch.Tensor, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            raise ValueError("the token transformer's encoder layer takes no attention masks")
        attn = self.self_attn
        b, n, d = x.shape
        heads = attn.num_heads
        qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d_h)
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return self.dropout1(attn.out_proj(out.transpose(1, 2).reshape(b, n, d)))


class TokenTransformer(nn.Module):
    """Positions as tokens: Linear(C -> d), a post-LN TransformerEncoder, Linear(d -> C); optional learned
    positional embeddings (without them the map is permutation-equivariant over positions)."""

    def __init__(self, channels: int, positions: int, hidden: int, layers: int, heads: int, ffn: int,
                 dropout: float, positional: bool, attention_dropout: float | None = None):
        super().__init__()
        self.inp, self.out = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        layer = EncoderLayer(hidden, heads, ffn, dropout, activation="relu", batch_first=True)
        layer.dropout, layer.dropout1, layer.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        # Dropout on the attention weights (``dropout`` when None, as torch's layer does). At 0, torch's fused
        # attention kernel runs; any other value materialises the (tokens x tokens) weights and their random mask.
        layer.self_attn.dropout = dropout if attention_dropout is None else attention_dropout
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pos = nn.Parameter(torch.randn(1, positions, hidden) * 0.02) if positional else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.inp(x.flatten(2).transpose(1, 2))  # (B, H*W, d)
        if self.pos is not None:
            if self.pos.shape[1] != h * w:
                raise ValueError(f"transformer_pe was built for {self.pos.shape[1]} positions, got {h}x{w}")
            tokens = tokens + self.pos
        return self.out(self.encoder(tokens)).transpose(1, 2).reshape(b, c, h, w)


class Residual(nn.Module):
    """x + f(x), with f's last layer zeroed at initialisation: training starts at the identity map."""

    def __init__(self, net: nn.Module, last: nn.Module):
        super().__init__()
        self.net = net
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class LinearStart(nn.Module):
    """A fixed 1x1 affine map (buffers: never trained) plus f(x), f's last layer zeroed at initialisation: training
    starts at the affine map's prediction (set by ``set_start``), and f learns the correction."""

    def __init__(self, channels: int, net: nn.Module, last: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("weight", torch.eye(channels).view(channels, channels, 1, 1))
        self.register_buffer("bias", torch.zeros(channels))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def set_start(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Sets the fixed map to y = weight x + bias ((C, C) and (C,), in the features' coordinates)."""
        self.weight.copy_(weight.view_as(self.weight))
        self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, self.bias) + self.net(x)


def build_net(name: str, channels: int, positions: int, size: dict, start: str = "identity") -> nn.Module:
    """Returns the untrained network of a learned map (sizes from ``MAP_SIZES``).

    ``start`` (see the module docstring): ``linear`` wraps a non-linear map as ``LinearStart`` (its fixed map the
    identity until ``set_start``), ``identity`` as x + f(x), ``scratch`` leaves the reference's plain architecture.
    ``linear_sgd`` is the plain 1x1 affine map: at W = I, b = 0 unless ``scratch`` (torch's initialisation).
    """
    if start not in START_POINTS:
        raise ValueError(f"start must be one of {', '.join(START_POINTS)}, got {start!r}")
    h, p = size["hidden"], size["dropout"]
    if name == "linear_sgd":
        net = nn.Conv2d(channels, channels, 1)
        if start != "scratch":
            with torch.no_grad():
                net.weight.copy_(torch.eye(channels).view_as(net.weight))
                net.bias.zero_()
        return net
    if name == "mlp":
        net = PerPosition(nn.Sequential(nn.Linear(channels, h), nn.ReLU(), Dropout(p), nn.Linear(h, channels)))
        last = net.net[-1]
    elif name == "cnn":
        net = nn.Sequential(nn.Conv2d(channels, h, 3, padding=1), nn.BatchNorm2d(h), nn.ReLU(), nn.Dropout2d(p),
                            nn.Conv2d(h, channels, 3, padding=1), nn.BatchNorm2d(channels))
        last = net[-1]
    elif name in ("transformer", "transformer_pe"):
        net = TokenTransformer(channels, positions, h, size["layers"], size["heads"], size["ffn"], p,
                               positional=name == "transformer_pe", attention_dropout=size.get("attention_dropout"))
        last = net.out
    else:
        raise ValueError(f"no network for {name!r}")
    if start == "linear":
        return LinearStart(channels, net, last)
    return Residual(net, last) if start == "identity" else net


def normalised_affine(weight: torch.Tensor, bias: torch.Tensor, normalizer: Normalizer) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Returns (W_n, b_n): the affine map y = W x + b on raw features as it acts on features normalised by
    ``normalizer`` (the same statistics for input and output): W_n = S^-1 W S, b_n = S^-1 (W m + b - m)."""
    m, s = normalizer.mean.view(-1).double(), normalizer.std.view(-1).double()
    w = weight.double()
    return (w / s[:, None] * s[None, :]).float(), ((w @ m + bias.double() - m) / s).float()


def identity_prior(alpha: float, channels: int, mse_weight: float) -> Callable[[nn.Module], torch.Tensor]:
    """Returns the penalty ``mse_weight * alpha / C * ||W - I||^2`` on a 1x1 affine map's weight: the closed form's
    ridge prior toward W = I (relative strength ``alpha``) on the scale of the loss's mean squared error over
    normalised features (whose trace(X^T X) / C is the number of positions)."""
    coef = mse_weight * float(alpha) / channels
    eye = torch.eye(channels)

    def penalty(net: nn.Module) -> torch.Tensor:
        w = net.weight[:, :, 0, 0]
        return coef * (w - eye.to(w)).pow(2).sum()
    return penalty


class LearnedMapping(Mapping):
    """A network trained with the reference loss on normalised features; predictions are de-normalised."""

    learned = True

    def _linear(self, data: FitData) -> Linear:
        return Linear(MapOptions(ridge=self.options.ridge)).fit(data)

    def _uses_linear(self) -> bool:
        """Returns whether the fit reads the closed-form linear map (its start, or linear_sgd's prior)."""
        return self.options.start == "linear" or (self.name == "linear_sgd" and self.options.start != "scratch")

    def identity(self, data: FitData) -> str:
        """Returns the content key of this map trained on ``data`` (architecture, start, size, training, pairs)."""
        size = {} if self.name == "linear_sgd" else MAP_SIZES[self.options.size]
        start = {"start": self.options.start, **({"ridge": self.options.ridge} if self._uses_linear() else {})}
        return content_key({"map": self.name, "size": size, **start, "train": asdict(self.options.train),
                            "data": data.key, "dropout": DROPOUT})

    def fit(self, data: FitData, context: Context | None = None) -> "LearnedMapping":
        """Returns self, trained on ``data`` or loaded from the map cache.

        ``context`` (``featmap.core.distributed``): train under DistributedDataParallel (``train.strategy``): rank 0
        decides whether the cached map is usable and writes the result, and every rank ends with rank 0's map.
        """
        strategy = strategy_for(context)
        x_train, y_train = data.tensors("train")
        x_val, y_val = data.tensors("val")
        c, h, w = x_train.shape[1:]
        key = self.identity(data)
        root = Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir()
        final, partial = root / "maps" / f"{key}.pt", root / "maps" / f"{key}.partial.pt"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.options.train.seed, "init", key))
            net = build_net(self.name, c, h * w, MAP_SIZES[self.options.size], self.options.start)
        self.model = NormalizedMap(net, Normalizer(torch.zeros(c), torch.ones(c)))

        def load(path: Path) -> dict:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(saved["model"])  # a stale entry (another architecture) fails here
            return saved

        def train() -> dict:
            normalizer = Normalizer.fit(x_train)
            penalty = None
            if self._uses_linear():
                linear = self._linear(data)
                if isinstance(net, LinearStart):
                    net.set_start(*normalised_affine(linear.weight, linear.bias, normalizer))
                else:  # linear_sgd: the closed form's prior
                    penalty = identity_prior(linear.alpha, c, self.options.train.mse_weight)
            model, history = train_map(net, (x_train, y_train), (x_val, y_val), self.options.train,
                                       resolve_device(self.options.device), checkpoint=partial,
                                       progress=self.options.progress, desc=f"{self.name}", context=context,
                                       normalizer=normalizer, penalty=penalty)
            return {"model": model.state_dict(), "history": {k: v for k, v in history.items() if k != "config"}}

        saved = strategy.cached(final, load, train, lambda f, value: torch.save(value, f))
        if strategy.writes:
            partial.unlink(missing_ok=True)
        self.model.load_state_dict(saved["model"])
        self.model.eval()
        self.history = saved["history"]
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.net.parameters())

    def fit_seconds(self) -> float:
        """Returns the training time recorded when the map was trained (also when loaded from the cache)."""
        return float(self.history["seconds"])

    def extra_metrics(self) -> dict[str, float]:
        """Returns the fit's convergence: steps run, the kept weights' step, whether early stopping ended it (1) or
        the cap (0), and the objective on the training and validation pairs at the kept weights."""
        h = self.history
        return {"steps": h["steps"], "best_step": h["best_step"], "stopped_early": float(h["stopped_early"]),
                "train_loss": h["train_loss"], "best_val_loss": h["best_val_loss"]}


def objective(mapping: Mapping, data: FitData, cfg: TrainConfig) -> dict[str, float]:
    """Returns {"train_loss", "best_val_loss"}: the trained maps' objective (the reference loss, ``cfg``'s weights, on
    features normalised by the training inputs' statistics) of a fitted ``mapping`` on ``data``'s training and
    validation pairs: a closed-form map's numbers on the same scale as a trained map's own."""
    train, val = data.tensors("train"), data.tensors("val")
    losses = map_losses(mapping.predict, Normalizer.fit(train[0]), {"train": train, "val": val}, cfg)
    return {"train_loss": losses["train"], "best_val_loss": losses["val"]}


def _learned(name: str, per_position: bool, linear: bool = False) -> type[LearnedMapping]:
    return type(name, (LearnedMapping,), {"name": name, "per_position": per_position, "linear": linear,
                                          "__doc__": f"Learned map {name!r} (see module docstring)."})


for _cls in (_learned("linear_sgd", True, linear=True), _learned("mlp", True), _learned("cnn", False),
             _learned("transformer", False), _learned("transformer_pe", False)):
    MAPPINGS.add(_cls.name, lambda cls=_cls: cls)
