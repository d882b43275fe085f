"""Closed-form maps: identity (the floor), additive, shared linear (ridge toward I), local linear, Procrustes."""
from __future__ import annotations

import torch

from featmap.maps.base import MAPPINGS, FitData, Mapping
from featmap.maps.stats import RIDGE_GRID, LinearStats, PositionStats, RidgeSolver, fit_ridge, select_ridge


class Identity(Mapping):
    """y = x: the floor."""

    name, linear = "identity", True

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _square_stats(data: FitData, name: str) -> LinearStats:
    """Returns the statistics of the training photos for a map that needs C_in = C_out.

    Every map, closed-form or trained, is fit on the training photos only; the validation photos choose (the ridge
    strength, the early-stopping epoch) and score the choice of a best map, so maps are compared on equal terms.
    """
    stats = data.stats("train")
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
    photos held out of the training photos); a number fixes it. The map is fit on the training photos only (as
    every map: the validation photos choose, they are not fit). The absolute strength is
    ``ridge * trace(X^T X) / C`` of the training inputs; ``alpha_at_edge`` flags a strength at the grid's largest
    value, where the prior rather than the data may decide the map's geometry.
    """

    name, linear = "linear", True

    def _stats(self, data: FitData, part: str) -> LinearStats:
        return data.stats(part)

    def fit(self, data: FitData) -> "Linear":
        train, val = self._stats(data, "train"), self._stats(data, "val")
        auto = self.options.ridge == "auto" and val is not None and val.n > 0
        solver = RidgeSolver(train) if auto else None  # one eigendecomposition for the whole grid and the fit
        self.alpha, self.val_errors = select_ridge(self.options.ridge, train, val, solver)
        self.lam = self.alpha * train.mean_eigenvalue
        coef = fit_ridge(train, self.lam) if solver is None else solver.coef(self.lam)
        self.weight = coef[..., :-1, :].transpose(-1, -2).float().contiguous()  # (C_out, C_in), per position
        self.bias = coef[..., -1, :].float()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight.to(x), x) + self.bias.view(1, -1, 1, 1).to(x)

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def extra_metrics(self) -> dict[str, float]:
        out = {"ridge_alpha": self.alpha, "ridge_lambda": self.lam}
        if self.options.ridge == "auto":
            out["alpha_at_edge"] = float(self.alpha == max(RIDGE_GRID))
        return out


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


for _cls in (Identity, Additive, Linear, LocalLinear, Procrustes):
    MAPPINGS.add(_cls.name, lambda cls=_cls: cls)
