"""The fast closed-form ridge fits (one eigendecomposition per position, bias eliminated by centring) equal the
plain solve of the augmented system they replaced, to float64 rounding."""
import pytest
import torch

from featmap.maps.base import MapOptions
from featmap.maps.closed_form import Linear, LocalLinear
from featmap.maps.stats import RIDGE_GRID, LinearStats, PositionStats, RidgeSolver, fit_ridge, select_ridge


def reference_fit(stats: LinearStats, lam: float) -> torch.Tensor:
    """The direct solve: (xtx + lam diag(1,..,1,0)) B = xty + lam [T; 0] on the augmented [x, 1] statistics."""
    c = stats.c_in
    penalty = torch.zeros(c + 1, dtype=torch.float64)
    penalty[:c] = lam
    target = torch.zeros(c + 1, stats.c_out, dtype=torch.float64)
    if stats.c_in == stats.c_out:
        target[:c] = torch.eye(c, dtype=torch.float64)
    return torch.linalg.solve(stats.xtx + torch.diag(penalty), stats.xty + penalty[:, None] * target)


def reference_select(train: LinearStats, val: LinearStats) -> tuple[float, dict]:
    errors = {a: val.sse(reference_fit(train, a * train.mean_eigenvalue)) for a in RIDGE_GRID}
    return min(errors, key=errors.get), errors


def pairs(c_in: int, c_out: int, n: int, hw: int, seed: int, mean: float = 1.0, noise: float = 0.3):
    """Returns x (n, c_in, hw, hw) with a non-zero mean and correlated channels and y = A x + b + noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c_in, c_in, generator=g, dtype=torch.float64) / c_in ** 0.5
    x = torch.einsum("dc,bdhw->bchw", mix, torch.randn(n, c_in, hw, hw, generator=g, dtype=torch.float64)) + mean
    a = torch.randn(c_out, c_in, generator=g, dtype=torch.float64) / c_in ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    y = torch.einsum("oc,bchw->bohw", a, x) + b.view(1, -1, 1, 1)
    return a, b, x, y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)


def stats_of(kind: str, x: torch.Tensor, y: torch.Tensor) -> LinearStats:
    if kind == "shared":
        return LinearStats(x.shape[1], y.shape[1]).update(x, y)
    return PositionStats(x.shape[1], y.shape[1], x.shape[2] * x.shape[3]).update(x, y)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest entry, per position for (P, ...) coefficients."""
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    return float(((a - b).abs().amax((1, 2)) / b.abs().amax((1, 2))).max())


@pytest.mark.parametrize("kind", ["shared", "position"])
@pytest.mark.parametrize("c_in,c_out", [(9, 9), (9, 5), (6, 11)])
def test_fits_equal_the_direct_solve(kind, c_in, c_out):
    _, _, x, y = pairs(c_in, c_out, n=40, hw=3, seed=c_in + c_out)
    stats = stats_of(kind, x, y)
    solver = RidgeSolver(stats)
    for alpha in (0.0, 1e-4, 0.3, 1.0, 100.0):
        lam = alpha * stats.mean_eigenvalue
        ref = reference_fit(stats, lam)
        assert fit_ridge(stats, lam).shape == ref.shape == solver.coef(lam).shape
        assert rel(fit_ridge(stats, lam), ref) < 1e-10
        assert rel(solver.coef(lam), ref) < 1e-10


@pytest.mark.parametrize("kind", ["shared", "position"])
def test_large_means_keep_the_exact_fit(kind):
    _, _, x, y = pairs(8, 8, n=60, hw=2, seed=3, mean=30.0)  # centring by subtraction on raw sums
    stats = stats_of(kind, x, y)
    for lam in (0.0, 0.1 * stats.mean_eigenvalue):
        assert rel(fit_ridge(stats, lam), reference_fit(stats, lam)) < 1e-8
        assert rel(RidgeSolver(stats).coef(lam), reference_fit(stats, lam)) < 1e-8


@pytest.mark.parametrize("kind", ["shared", "position"])
def test_planted_affine_map_is_recovered(kind):
    a, b, x, y = pairs(10, 7, n=80, hw=2, seed=5, noise=1e-6)
    coef = fit_ridge(stats_of(kind, x, y), 0.0)
    coef = coef if kind == "shared" else coef[2]
    assert torch.allclose(coef[:-1].T, a, atol=1e-5) and torch.allclose(coef[-1], b, atol=1e-5)
    _, alpha_coef = select_ridge("auto", stats_of(kind, x[:60], y[:60]), stats_of(kind, x[60:], y[60:]))
    assert min(alpha_coef, key=alpha_coef.get) <= 1e-3


@pytest.mark.parametrize("kind", ["shared", "position"])
@pytest.mark.parametrize("c_in,c_out", [(16, 16), (16, 6)])
def test_singular_least_squares_is_the_minimum_norm_solution(kind, c_in, c_out):
    """Fewer samples than channels at lam = 0: lstsq's minimum-norm solution of the augmented system."""
    _, _, x, y = pairs(c_in, c_out, n=1 if kind == "shared" else 7, hw=3 if kind == "shared" else 2, seed=9,
                       mean=2.0)
    stats = stats_of(kind, x, y)
    ref = torch.linalg.lstsq(stats.xtx, stats.xty, driver="gelsd").solution
    assert rel(fit_ridge(stats, 0.0), ref) < 1e-9
    solver = RidgeSolver(stats)
    assert rel(solver.coef(0.0), ref) < 1e-9
    _, _, xv, yv = pairs(c_in, c_out, n=4, hw=x.shape[2], seed=10, mean=2.0)
    val = stats_of(kind, xv, yv)
    assert solver.sse(val, [0.0])[0] == pytest.approx(val.sse(ref), rel=1e-9)
    # the training pairs are interpolated exactly
    assert stats.sse(solver.coef(0.0)) == pytest.approx(0.0, abs=1e-8 * float(torch.as_tensor(stats.yty).sum()))


@pytest.mark.parametrize("kind", ["shared", "position"])
@pytest.mark.parametrize("c_in,c_out,noise", [(12, 12, 0.3), (12, 12, 3.0), (12, 7, 1.0)])
def test_select_ridge_matches_the_reference(kind, c_in, c_out, noise):
    _, _, x, y = pairs(c_in, c_out, n=50, hw=2, seed=c_out, noise=noise)
    train, val = stats_of(kind, x[:30], y[:30]), stats_of(kind, x[30:], y[30:])
    alpha, errors = select_ridge("auto", train, val)
    ref_alpha, ref_errors = reference_select(train, val)
    assert alpha == ref_alpha and list(errors) == list(ref_errors)
    for a in RIDGE_GRID:
        assert errors[a] == pytest.approx(ref_errors[a], rel=1e-10)
    assert select_ridge(0.5, train, val) == (0.5, {})


def test_map_fits_use_the_shared_decomposition():
    _, _, x, y = pairs(8, 8, n=40, hw=3, seed=2, noise=1.0)

    class Data:
        def __init__(self, kind):
            self.parts = {"train": stats_of(kind, x[:30], y[:30]), "val": stats_of(kind, x[30:], y[30:])}

        def stats(self, part):
            return self.parts[part]

        position_stats = stats

    for cls, kind in ((Linear, "shared"), (LocalLinear, "position")):
        data = Data(kind)
        m = cls(MapOptions(ridge="auto")).fit(data)
        ref_alpha, ref_errors = reference_select(data.parts["train"], data.parts["val"])
        assert m.alpha == ref_alpha
        coef = reference_fit(data.parts["train"], m.lam)
        assert torch.allclose(m.weight, coef[..., :-1, :].transpose(-1, -2).float(), atol=1e-6)
        assert torch.allclose(m.bias, coef[..., -1, :].float(), atol=1e-6)
        fixed = cls(MapOptions(ridge=0.3)).fit(data)
        assert torch.allclose(fixed.weight, fit_ridge(data.parts["train"], fixed.lam)[..., :-1, :].transpose(-1, -2)
                              .float(), atol=1e-6)


def test_in_place_updates_equal_one_float64_product():
    _, _, x, y = pairs(5, 4, n=12, hw=3, seed=4)
    x, y = x.float(), y.float()
    stats = PositionStats(5, 4, 9)
    for i in range(0, 12, 5):
        stats.update(x[i:i + 5], y[i:i + 5])
    xa = torch.cat([x.double().flatten(2).permute(2, 0, 1), torch.ones(9, 12, 1, dtype=torch.float64)], 2)
    assert torch.allclose(stats.xtx, xa.mT @ xa, rtol=1e-13, atol=0)
    assert torch.allclose(stats.xty, xa.mT @ y.double().flatten(2).permute(2, 0, 1), rtol=1e-13, atol=1e-13)
    shared = LinearStats(5, 4).update(x, y)
    assert torch.allclose(shared.xtx, stats.xtx.sum(0), rtol=1e-13, atol=0)
