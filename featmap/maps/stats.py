"""Streaming sufficient statistics of (x, y) channel-vector pairs and the exact ridge fit toward W = I."""
from __future__ import annotations

import torch

# Candidate ridge strengths, relative to the mean eigenvalue trace(X^T X) / C of the inputs.
RIDGE_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


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
