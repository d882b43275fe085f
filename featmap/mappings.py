"""Maps from original to manipulated feature maps, (B, C, H, W) -> (B, C, H, W).

This module holds the interface, the registry and the closed-form maps: ``identity`` (y = x, the floor
every fitted map must beat), ``additive`` (y = x + delta, one delta per channel), ``linear`` (y = W x + b
at every position, shared over positions, fit exactly by ridge toward the identity on streaming
sufficient statistics), ``local_linear`` (a separate W_p, b_p per position, same ridge) and
``procrustes`` (y = R (x - mean_x) + mean_y with R orthogonal). The trained maps live in ``learned.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .registry import Registry
from .training import TrainConfig

# Candidate ridge strengths, relative to the mean eigenvalue trace(X^T X) / C of the inputs.
RIDGE_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def positions(x: torch.Tensor) -> torch.Tensor:
    """Returns the (B*H*W, C) channel vectors of a (B, C, H, W) map."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class LinearStats:
    """Streaming sufficient statistics of (x, y) channel-vector pairs, with a constant input for the bias.

    ``xtx`` = sum of [x,1]^T [x,1] ((C_in+1)^2), ``xty`` = sum of [x,1]^T y ((C_in+1) x C_out), ``yty`` = sum
    of ||y||^2, ``n`` = number of positions; float64. Memory does not grow with the number of images.
    """

    def __init__(self, c_in: int, c_out: int):
        self.c_in, self.c_out = c_in, c_out
        self.xtx = torch.zeros(c_in + 1, c_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(c_in + 1, c_out, dtype=torch.float64)
        self.yty = 0.0
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "LinearStats":
        """Adds the positions of a (B, C_in, H, W) input and (B, C_out, H, W) target batch."""
        if (x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:] or x.shape[1] != self.c_in
                or y.shape[1] != self.c_out):
            raise ValueError(f"stats for {self.c_in}->{self.c_out} channels got x {tuple(x.shape)}, y {tuple(y.shape)}")
        xp, yp = positions(x).double(), positions(y).double()
        xa = torch.cat([xp, torch.ones(len(xp), 1, dtype=torch.float64)], 1)
        self.xtx += xa.T @ xa
        self.xty += xa.T @ yp
        self.yty += float((yp * yp).sum())
        self.n += len(xp)
        return self

    def merged(self, other: "LinearStats") -> "LinearStats":
        """Returns the statistics of both sets of positions."""
        out = LinearStats(self.c_in, self.c_out)
        out.xtx, out.xty = self.xtx + other.xtx, self.xty + other.xty
        out.yty, out.n = self.yty + other.yty, self.n + other.n
        return out

    @property
    def mean_eigenvalue(self) -> float:
        """Returns trace(X^T X) / C_in over the raw inputs (the unit of the relative ridge strength)."""
        return float(self.xtx[:-1, :-1].trace()) / self.c_in

    def sse(self, coef: torch.Tensor) -> float:
        """Returns sum ||[x,1] coef - y||^2 over these positions, for a (C_in+1, C_out) coefficient matrix."""
        return float((coef * (self.xtx @ coef)).sum() - 2 * (coef * self.xty).sum()) + self.yty


class PositionStats(LinearStats):
    """``LinearStats`` kept separately for every position: a leading (H*W) axis on xtx, xty and yty."""

    def __init__(self, c_in: int, c_out: int, n_positions: int):
        super().__init__(c_in, c_out)
        self.xtx = torch.zeros(n_positions, c_in + 1, c_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_positions, c_in + 1, c_out, dtype=torch.float64)
        self.yty = torch.zeros(n_positions, dtype=torch.float64)
        self.n_positions = n_positions

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "PositionStats":
        if x.shape[1] != self.c_in or y.shape[1] != self.c_out or x.shape[2] * x.shape[3] != self.n_positions:
            raise ValueError(f"position stats for {self.c_in}->{self.c_out} channels at {self.n_positions} "
                             f"positions got x {tuple(x.shape)}, y {tuple(y.shape)}")
        xp = x.flatten(2).permute(2, 0, 1).double()  # (P, B, C)
        yp = y.flatten(2).permute(2, 0, 1).double()
        xa = torch.cat([xp, torch.ones(*xp.shape[:2], 1, dtype=torch.float64)], 2)
        self.xtx += xa.transpose(1, 2) @ xa
        self.xty += xa.transpose(1, 2) @ yp
        self.yty += (yp * yp).sum((1, 2))
        self.n += x.shape[0]  # samples per position
        return self

    def merged(self, other: "PositionStats") -> "PositionStats":
        out = PositionStats(self.c_in, self.c_out, self.n_positions)
        out.xtx, out.xty = self.xtx + other.xtx, self.xty + other.xty
        out.yty, out.n = self.yty + other.yty, self.n + other.n
        return out

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.xtx[:, :-1, :-1].diagonal(dim1=1, dim2=2).sum()) / (self.c_in * self.n_positions)

    def sse(self, coef: torch.Tensor) -> float:
        return float((coef * (self.xtx @ coef)).sum() - 2 * (coef * self.xty).sum() + self.yty.sum())


def fit_ridge(stats: LinearStats, lam: float) -> torch.Tensor:
    """Returns the (C_in+1, C_out) coefficients minimising ||[X,1] B - Y||^2 + lam ||W - I||^2 (bias free).

    lam -> 0 is least squares; lam -> inf is W = I plus the mean shift (the additive map). Position
    statistics give one such solution per position, (P, C_in+1, C_out).
    """
    if stats.n == 0:
        raise ValueError("cannot fit a map on zero training positions")
    c = stats.c_in
    penalty = torch.zeros(c + 1, dtype=torch.float64)
    penalty[:c] = lam
    target = torch.zeros(c + 1, stats.c_out, dtype=torch.float64)
    if stats.c_in == stats.c_out:
        target[:c] = torch.eye(c, dtype=torch.float64)
    a = stats.xtx + torch.diag(penalty)
    b = stats.xty + penalty[:, None] * target
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:  # singular (fewer positions than channels, lam = 0): minimum-norm solution
        return torch.linalg.lstsq(a, b, driver="gelsd").solution


def select_ridge(ridge: float | str, train: LinearStats, val: LinearStats | None) -> tuple[float, dict]:
    """Returns the relative ridge strength (fixed, or the grid value with the lowest validation error) and
    the validation error of every candidate tried."""
    if ridge != "auto":
        return float(ridge), {}
    if val is None or val.n == 0:
        raise ValueError("ridge='auto' needs validation positions; give a number instead")
    errors = {a: val.sse(fit_ridge(train, a * train.mean_eigenvalue)) for a in RIDGE_GRID}
    return min(errors, key=errors.get), errors


class FitData(Protocol):
    """What a mapping's ``fit`` may ask of the training data (see ``pipeline.PairData``)."""

    key: str

    def stats(self, part: str) -> LinearStats: ...

    def position_stats(self, part: str) -> PositionStats: ...

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]: ...


# Learned-map sizes: "tiny" for tests and quick looks, "small" keeps the cold book under its CPU budget,
# "reference" is the study's (section 4).
MAP_SIZES = {
    "tiny": {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.0},
    "small": {"hidden": 128, "layers": 2, "heads": 4, "ffn": 256, "dropout": 0.2},
    "reference": {"hidden": 512, "layers": 4, "heads": 8, "ffn": 1024, "dropout": 0.2},
}


@dataclass(frozen=True)
class MapOptions:
    """Options every mapping may read: ridge strength, learned-map size preset, training settings."""

    ridge: float | str = "auto"
    size: str = "small"
    residual: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        if self.ridge != "auto" and (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float))
                                     or self.ridge < 0 or not math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be 'auto' or a non-negative number, got {self.ridge!r}")
        if self.size not in MAP_SIZES:
            raise ValueError(f"unknown map size {self.size!r}; known: {', '.join(MAP_SIZES)}")


class Mapping:
    """A map from original to manipulated feature maps; subclasses say whether it is linear, whether it acts
    on each position alone, and whether it is trained by gradient descent."""

    name = "mapping"
    linear = False
    per_position = True
    learned = False

    def __init__(self, options: MapOptions | None = None):
        self.options = options or MapOptions()

    def fit(self, data: FitData) -> "Mapping":
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def n_params(self) -> int:
        return 0

    def fit_seconds(self) -> float | None:
        """Returns the recorded training time where the fit was done elsewhere (a cached map), else None."""
        return None

    def extra_metrics(self) -> dict[str, float]:
        """Returns fit facts worth a results row (e.g. the chosen ridge strength)."""
        return {}


class Identity(Mapping):
    """y = x: the floor."""

    name, linear = "identity", True

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _square_stats(data: FitData, name: str) -> LinearStats:
    """Returns the statistics of all training photos (train + validation) for a map that needs C_in = C_out."""
    stats = data.stats("train").merged(data.stats("val"))
    if stats.c_in != stats.c_out:
        raise ValueError(f"{name} needs equal input and output channels, got {stats.c_in} and {stats.c_out}")
    return stats


class Additive(Mapping):
    """y = x + delta, delta per channel: the mean shift of the training pairs."""

    name, linear = "additive", True

    def fit(self, data: FitData) -> "Additive":
        stats = _square_stats(data, self.name)
        self.delta = ((stats.xty[-1] - stats.xtx[-1, :-1]) / stats.n).float()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta.view(1, -1, 1, 1).to(x)

    def n_params(self) -> int:
        return self.delta.numel()


class Linear(Mapping):
    """y = W x + b at every position (a 1x1 affine map shared over positions), fit in closed form.

    ``ridge`` = "auto" picks the relative strength from ``RIDGE_GRID`` by validation error (validation
    photos held out of the training photos), then refits on all training photos; a number fixes it.
    The absolute strength is ``ridge * trace(X^T X) / C``.
    """

    name, linear = "linear", True

    def _stats(self, data: FitData, part: str) -> LinearStats:
        return data.stats(part)

    def fit(self, data: FitData) -> "Linear":
        train, val = self._stats(data, "train"), self._stats(data, "val")
        self.alpha, self.val_errors = select_ridge(self.options.ridge, train, val)
        stats = train.merged(val)
        self.lam = self.alpha * stats.mean_eigenvalue
        coef = fit_ridge(stats, self.lam)
        self.weight = coef[..., :-1, :].transpose(-1, -2).float().contiguous()  # (C_out, C_in), per position
        self.bias = coef[..., -1, :].float()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight.to(x), x) + self.bias.view(1, -1, 1, 1).to(x)

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def extra_metrics(self) -> dict[str, float]:
        return {"ridge_alpha": self.alpha, "ridge_lambda": self.lam}


class LocalLinear(Linear):
    """y_p = W_p x_p + b_p: a separate affine map at every position p (not shared), ridge toward W_p = I."""

    name, linear = "local_linear", True

    def _stats(self, data: FitData, part: str) -> PositionStats:
        return data.position_stats(part)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.weight.shape[0] != h * w:
            raise ValueError(f"local_linear was fit on {self.weight.shape[0]} positions, got a {h}x{w} grid")
        out = torch.einsum("poc,bcp->bop", self.weight.to(x), x.flatten(2)) + self.bias.T.to(x)[None]
        return out.reshape(b, -1, h, w)


class Procrustes(Mapping):
    """y = R (x - mean_x) + mean_y with R orthogonal: R = U V^T from the SVD of the centred cross-covariance."""

    name, linear = "procrustes", True

    def fit(self, data: FitData) -> "Procrustes":
        s = _square_stats(data, self.name)
        mx, my = s.xtx[-1, :-1] / s.n, s.xty[-1] / s.n
        cross = s.xty[:-1] - s.n * torch.outer(mx, my)  # sum of (x - mx)(y - my)^T
        u, _, vh = torch.linalg.svd(cross)
        rotation = u @ vh  # y_row = (x_row - mx) @ rotation + my
        self.weight = rotation.T.float().contiguous()
        self.bias = (my - rotation.T @ mx).float()
        return self

    predict = Linear.predict

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()


MAPPINGS: Registry[type[Mapping]] = Registry("mapping")  # name -> class
for _cls in (Identity, Additive, Linear, LocalLinear, Procrustes):
    MAPPINGS.add(_cls.name, lambda cls=_cls: cls)


def get_mapping(name: str, options: MapOptions | None = None) -> Mapping:
    """Returns a new, unfitted mapping registered under ``name``."""
    return MAPPINGS.get(name)(options)


from . import learned  # noqa: E402,F401  (registers the trained maps; it imports the names above)
