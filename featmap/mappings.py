"""Maps from original to manipulated feature maps, (B, C, H, W) -> (B, C, H, W).

This module holds the closed-form maps: ``identity`` (y = x, the floor every learned map must beat),
``additive`` (y = x + delta, one delta per channel) and ``linear`` (y = W x + b at every position,
shared over positions, fit exactly by ridge toward the identity on streaming sufficient statistics).
"""
from __future__ import annotations

import math

import torch

from .registry import Registry

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
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:] or x.shape[1] != self.c_in or y.shape[1] != self.c_out:
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


def fit_ridge(stats: LinearStats, lam: float) -> torch.Tensor:
    """Returns the (C_in+1, C_out) coefficients minimising ||[X,1] B - Y||^2 + lam ||W - I||^2 (bias free).

    lam -> 0 is least squares; lam -> inf is W = I plus the mean shift (the additive map).
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


class Mapping:
    """A map from original to manipulated feature maps; subclasses say whether it is linear and local."""

    name = "mapping"
    linear = False
    per_position = True

    def fit(self, train: LinearStats, val: LinearStats | None = None) -> "Mapping":
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def n_params(self) -> int:
        return 0

    def extra_metrics(self) -> dict[str, float]:
        """Returns fit facts worth a results row (e.g. the chosen ridge strength)."""
        return {}


class Identity(Mapping):
    """y = x: the floor."""

    name, linear = "identity", True

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Additive(Mapping):
    """y = x + delta, delta per channel: the mean shift of the training pairs."""

    name, linear = "additive", True

    def fit(self, train: LinearStats, val: LinearStats | None = None) -> "Additive":
        stats = train.merged(val) if val is not None else train
        if stats.c_in != stats.c_out:
            raise ValueError(f"additive needs equal input and output channels, got {stats.c_in} and {stats.c_out}")
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

    def __init__(self, ridge: float | str = "auto"):
        if ridge != "auto" and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0
                                or not math.isfinite(ridge)):
            raise ValueError(f"ridge must be 'auto' or a non-negative number, got {ridge!r}")
        self.ridge = ridge

    def fit(self, train: LinearStats, val: LinearStats | None = None) -> "Linear":
        alpha = self.ridge
        self.val_errors = {}
        if alpha == "auto":
            if val is None or val.n == 0:
                raise ValueError("ridge='auto' needs validation positions; give a number instead")
            for a in RIDGE_GRID:
                coef = fit_ridge(train, a * train.mean_eigenvalue)
                self.val_errors[a] = val.sse(coef) / (val.n * val.c_out)
            alpha = min(self.val_errors, key=self.val_errors.get)
        stats = train.merged(val) if val is not None else train
        self.alpha = float(alpha)
        self.lam = self.alpha * stats.mean_eigenvalue
        coef = fit_ridge(stats, self.lam)
        self.weight = coef[:-1].T.float().contiguous()  # (C_out, C_in)
        self.bias = coef[-1].float()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight.to(x), x) + self.bias.view(1, -1, 1, 1).to(x)

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def extra_metrics(self) -> dict[str, float]:
        return {"ridge_alpha": self.alpha, "ridge_lambda": self.lam}


MAPPINGS: Registry[Mapping] = Registry("mapping")
MAPPINGS.add("identity", Identity)
MAPPINGS.add("additive", Additive)
MAPPINGS.add("linear", Linear)


def get_mapping(name: str, ridge: float | str = "auto") -> Mapping:
    """Returns a new, unfitted mapping registered under ``name``."""
    mapping = MAPPINGS.get(name)
    if isinstance(mapping, Linear):
        mapping = Linear(ridge)
    return mapping
