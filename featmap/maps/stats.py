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
        self.xtx.addmm_(xa.T, xa)  # in place: no (C+1)^2 temporary per batch; float64 throughout
        self.xty.addmm_(xa.T, yp)
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
        self.xtx.baddbmm_(xa.transpose(1, 2), xa)  # in place: no (P, C+1, C+1) temporary per batch
        self.xty.baddbmm_(xa.transpose(1, 2), yp)
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


_EPS = torch.finfo(torch.float64).eps
_CHUNK = 1 << 23  # float64 numbers in one (positions, C, C) temporary of the validation errors (64 MiB)


def _batched(stats: LinearStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns xtx (P, C_in+1, C_in+1), xty (P, C_in+1, C_out) and yty (P,); P = 1 for shared statistics."""
    if stats.xtx.dim() == 2:
        return stats.xtx[None], stats.xty[None], torch.as_tensor(stats.yty, dtype=torch.float64).reshape(1)
    return stats.xtx, stats.xty, stats.yty


def _centred(stats: LinearStats) -> tuple[torch.Tensor, ...]:
    """Returns the training means mean_x (P, C_in) and mean_y (P, C_out), the centred scatters S_xx (P, C_in, C_in)
    and S_xy (P, C_in, C_out), and the largest raw diagonal entry of xtx (P,), the scale of the rounding."""
    if stats.n == 0:
        raise ValueError("cannot fit a map on zero training positions")
    xtx, xty, _ = _batched(stats)
    n = float(stats.n)
    sx, sy = xtx[:, -1, :-1], xty[:, -1, :]
    mx, my = sx / n, sy / n
    sxx = torch.baddbmm(xtx[:, :-1, :-1], sx[:, :, None], mx[:, None, :], alpha=-1)  # sum (x - mx)(x - mx)^T
    sxy = torch.baddbmm(xty[:, :-1, :], sx[:, :, None], my[:, None, :], alpha=-1)
    return mx, my, sxx, sxy, xtx.diagonal(dim1=1, dim2=2).amax(1)


def _tolerance(c_in: int, largest: torch.Tensor, raw_scale: torch.Tensor) -> torch.Tensor:
    """Returns, per position, the level at or below which a regularised eigenvalue d + lam counts as zero (that
    direction is left out, the pseudo-inverse): (C_in+1) eps, lstsq's default, times the larger of the largest
    centred eigenvalue and the largest raw diagonal entry (centring by subtraction leaves errors of that size)."""
    return (c_in + 1) * _EPS * torch.maximum(largest, raw_scale)


def _matvec(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Returns a @ v for a (P, m, n) and v (P, n)."""
    return (a @ v[:, :, None])[:, :, 0]


class RidgeSolver:
    """The exact ridge solutions of one set of training statistics for any strength, from one eigendecomposition.

    The bias is unpenalised, so it is eliminated by centring on the training means: b = mean_y - W^T mean_x, and
    (S_xx + lam I) W = S_xy + lam T with S_xx, S_xy the centred scatters and T the target (I when C_in = C_out,
    else 0). With S_xx = Q diag(d) Q^T (one ``eigh`` per position), W = T + Q E, E = diag(1 / (d + lam)) J,
    J = Q^T (S_xy - S_xx T), for every lam; the validation errors of all lams need (C, C) products formed once.

    Where d + lam is zero to rounding (``_tolerance``; lam = 0 with fewer samples than channels) that direction is
    left out (the pseudo-inverse), and the coefficients are the minimum-norm solution of the augmented system on
    [X, 1]: what ``torch.linalg.lstsq`` returns for it. ``eigh`` sorts d ascending, so those directions are the
    first k of each position.
    """

    def __init__(self, stats: LinearStats):
        self.shared = stats.xtx.dim() == 2
        self.c_in, self.c_out, self.square = stats.c_in, stats.c_out, stats.c_in == stats.c_out
        self.mx, self.my, sxx, sxy, raw_scale = _centred(stats)
        self.d, self.q = torch.linalg.eigh(sxx)
        self.j = self.q.mT @ (sxy.sub_(sxx) if self.square else sxy)  # Q^T (S_xy - S_xx T)
        self.qmx = _matvec(self.q.mT, self.mx)  # Q^T mean_x
        self.b_base = self.my - self.mx if self.square else self.my  # mean_y - T^T mean_x
        self.tol = _tolerance(self.c_in, self.d[:, -1], raw_scale)

    def _solution(self, lam: float, part: slice = slice(None), bias: bool = True):
        """Returns, at strength ``lam`` and positions ``part``: f (P, C_in), 1 / (d + lam) or 0 where left out;
        b (P, C_out) (None if not ``bias`` and nothing is left out); k, the number of leading directions left out
        anywhere; and delta (P, k, C_out), what E has beyond diag(f) J in its first k rows: E = diag(f) J + [delta; 0].
        """
        den = self.d[part] + lam
        null = den <= self.tol[part, None]
        f = torch.where(null, torch.zeros_like(den), 1.0 / torch.where(null, torch.ones_like(den), den))
        k = int(null.sum(1).max())
        if k == 0 and not bias:
            return f, None, 0, None
        qmx = self.qmx[part]
        b = self.b_base[part] - _matvec(self.j[part].mT, f * qmx)  # mean_y - W^T mean_x
        if k == 0:
            return f, b, 0, None
        null, qmx_k = null[:, :k], qmx[:, :k]
        # The pseudo-inverse: no component of W along the left-out directions, E = -Q^T T there.
        delta = (-self.q[part, :, :k].mT if self.square else self.j.new_zeros(len(den), k, self.c_out))
        delta = delta * null[:, :, None]
        b = b - _matvec(delta.mT, qmx_k)
        # [v; -v^T mean_x] (v left out) spans the null space of the augmented system: trade W along v against the
        # bias down to the minimum norm of [W; b]: W += V u b^T / (1 + |u|^2), b /= 1 + |u|^2, u = V^T mean_x.
        u = qmx_k * null
        b = b / (1.0 + (u * u).sum(1))[:, None]
        return f, b, k, delta + u[:, :, None] * b[:, None, :]

    def coef(self, lam: float) -> torch.Tensor:
        """Returns the (C_in+1, C_out) coefficients at absolute strength ``lam`` ((P, C_in+1, C_out) per position)."""
        f, b, k, delta = self._solution(float(lam))
        e = self.j * f[:, :, None]
        if k:
            e[:, :k] += delta
        w = self.q @ e
        if self.square:
            w.diagonal(dim1=1, dim2=2).add_(1.0)
        coef = torch.cat([w, b[:, None, :]], 1)
        return coef[0] if self.shared else coef

    def sse(self, val: LinearStats, lams: list[float]) -> list[float]:
        """Returns ``val.sse(self.coef(lam))`` for every lam in ``lams``, from the validation statistics.

        With b = mean_y - W^T mean_x the error is the sum of ||E^T Q^T x~ - r||^2 over the validation pairs, with
        x~ = x - mean_x and r = (y - mean_y) - T^T x~ (training means): tr(E^T M E) - 2 tr(E^T N) + sum ||r||^2,
        M = Q^T C_xx Q, N = Q^T C_xr. As E = diag(f) J, f = 1 / (d + lam), the first two terms are
        f^T (M o J J^T) f and 2 f . rowsum(J o N): (C, C) work per lam once M o J J^T is formed.
        """
        a, r, yty = _batched(val)
        if a.shape != (len(self.q), self.c_in + 1, self.c_in + 1) or r.shape[1:] != (self.c_in + 1, self.c_out):
            raise ValueError(f"validation statistics xtx {tuple(val.xtx.shape)}, xty {tuple(val.xty.shape)} do not "
                             f"match the training statistics")
        nv = float(val.n)
        lams = [float(lam) for lam in lams]
        total = torch.zeros(len(lams), dtype=torch.float64)
        step = max(1, _CHUNK // (self.c_in * max(self.c_in, self.c_out)))
        for lo in range(0, len(self.q), step):
            part = slice(lo, lo + step)
            mx, my, q, j, qmx = self.mx[part], self.my[part], self.q[part], self.j[part], self.qmx[part]
            axx, ax, rxy, ay = a[part, :-1, :-1], a[part, -1, :-1], r[part, :-1, :], r[part, -1, :]
            dx = ax - nv * mx  # sum of x - mean_x; C_xx = A_xx - dx mx^T - mx ax^T, C_xy = R_xy - dx my^T - mx ay^T
            lo_rank = torch.stack([_matvec(q.mT, dx), qmx], 2)  # Q^T [dx, mx]
            qa = q.mT @ axx
            m = torch.baddbmm(qa @ q, lo_rank, torch.stack([qmx, _matvec(q.mT, ax)], 1), alpha=-1)
            cyy = yty[part] - 2 * (ay * my).sum(1) + nv * (my * my).sum(1)
            if self.square:  # r = y~ - x~: C_xr = C_xy - C_xx, sum ||r||^2 = tr(C_yy) - 2 tr(C_xy) + tr(C_xx)
                nn = torch.baddbmm((q.mT @ rxy).sub_(qa), lo_rank, torch.stack([my - mx, ay - ax], 1), alpha=-1)
                tr_xy = rxy.diagonal(dim1=1, dim2=2).sum(1) - (dx * my).sum(1) - (mx * ay).sum(1)
                tr_xx = axx.diagonal(dim1=1, dim2=2).sum(1) - (dx * mx).sum(1) - (mx * ax).sum(1)
                crr = cyy - 2 * tr_xy + tr_xx
            else:
                nn = torch.baddbmm(q.mT @ rxy, lo_rank, torch.stack([my, ay], 1), alpha=-1)
                crr = cyy
            del qa
            kk = torch.bmm(j, j.mT).mul_(m)  # M o J J^T
            g = torch.linalg.vecdot(j, nn, dim=2)
            solutions = [self._solution(lam, part, bias=False) for lam in lams]
            fs = torch.stack([f for f, *_ in solutions], 1)  # (P, lams, C_in)
            total += ((fs @ kk) * fs).sum((0, 2)) - 2 * (fs * g[:, None, :]).sum((0, 2)) + crr.sum()
            for i, (f, _, k, delta) in enumerate(solutions):
                if k:  # E = diag(f) J + [delta; 0]: the cross and square terms of delta
                    mfj = (m[:, :k, :] * f[:, None, :]) @ j
                    total[i] += (2 * (delta * mfj).sum() + (delta * (m[:, :k, :k] @ delta)).sum()
                                 - 2 * (delta * nn[:, :k]).sum())
        return total.tolist()


def fit_ridge(stats: LinearStats, lam: float) -> torch.Tensor:
    """Returns the (C_in+1, C_out) coefficients minimising ||[X,1] B - Y||^2 + lam ||W - I||^2 (bias free).

    lam -> 0 is least squares; lam -> inf is W = I plus the mean shift (the additive map). Position
    statistics give one such solution per position, (P, C_in+1, C_out). The bias is eliminated by centring (see
    ``RidgeSolver``); lam > 0 is one Cholesky solve of the centred system, and where the system is singular to
    rounding (lam = 0 with fewer positions than channels) the minimum-norm (least-squares) solution is returned.
    """
    lam = float(lam)
    mx, my, sxx, sxy, raw_scale = _centred(stats)
    trace = sxx.diagonal(dim1=1, dim2=2).sum(1)  # >= the largest eigenvalue
    if lam > 100 * float(_tolerance(stats.c_in, trace, raw_scale).max()):
        square = stats.c_in == stats.c_out
        rhs = sxy.sub_(sxx) if square else sxy  # S_xy - S_xx T
        sxx.diagonal(dim1=1, dim2=2).add_(lam)
        chol, info = torch.linalg.cholesky_ex(sxx)
        if not info.any():
            w = torch.cholesky_solve(rhs, chol)  # W - T
            b = my - (mx if square else 0.0) - _matvec(w.mT, mx)
            if square:
                w.diagonal(dim1=1, dim2=2).add_(1.0)
            coef = torch.cat([w, b[:, None, :]], 1)
            return coef[0] if stats.xtx.dim() == 2 else coef
    return RidgeSolver(stats).coef(lam)


def select_ridge(ridge: float | str, train: LinearStats, val: LinearStats | None,
                 solver: RidgeSolver | None = None) -> tuple[float, dict]:
    """Returns the relative ridge strength (fixed, or the grid value with the lowest validation error) and
    the validation error of every candidate tried; ``solver``, a ``RidgeSolver`` of ``train``, is reused if given."""
    if ridge != "auto":
        return float(ridge), {}
    if val is None or val.n == 0:
        raise ValueError("ridge='auto' needs validation positions; give a number instead")
    solver = solver or RidgeSolver(train)
    unit = train.mean_eigenvalue
    errors = dict(zip(RIDGE_GRID, solver.sse(val, [a * unit for a in RIDGE_GRID])))
    return min(errors, key=errors.get), errors
