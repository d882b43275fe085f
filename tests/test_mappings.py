import pytest
import torch

from featmap.core.registry import UnknownNameError
from featmap.maps.base import MAPPINGS, MapOptions, get_mapping
from featmap.maps.closed_form import Additive, Identity, Linear
from featmap.maps.stats import RIDGE_GRID, LinearStats, fit_ridge, positions


class StatsData:
    """A FitData holding ready statistics (validation empty unless given)."""

    def __init__(self, train, val=None):
        self.parts = {"train": train, "val": val or LinearStats(train.c_in, train.c_out)}
        self.key = "stats"

    def stats(self, part):
        return self.parts[part]


def fixed(ridge):
    return MapOptions(ridge=ridge)


def planted(seed: int, c: int = 12, n: int = 30, hw: int = 4, noise: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g, dtype=torch.float64) / c ** 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    y = torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1)
    y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return w, b, x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_recovers_a_planted_affine_map(seed):
    w, b, x, y = planted(seed)
    m = Linear(fixed(0.0)).fit(StatsData(LinearStats(12, 12).update(x, y)))
    assert torch.allclose(m.weight.double(), w, atol=1e-5)
    assert torch.allclose(m.bias.double(), b, atol=1e-5)
    assert torch.allclose(m.predict(x.float()).double(), y, atol=1e-4)


def test_streaming_statistics_equal_one_shot():
    _, _, x, y = planted(3, noise=0.1)
    one = LinearStats(12, 12).update(x, y)
    streamed = LinearStats(12, 12)
    for i in range(0, len(x), 7):
        streamed.update(x[i:i + 7], y[i:i + 7])
    assert torch.allclose(one.xtx, streamed.xtx) and torch.allclose(one.xty, streamed.xty)
    assert one.n == streamed.n == 30 * 16
    merged = LinearStats(12, 12).update(x[:10], y[:10]).merged(LinearStats(12, 12).update(x[10:], y[10:]))
    assert torch.allclose(fit_ridge(merged, 0.5), fit_ridge(one, 0.5), atol=1e-10)


def test_sse_from_statistics_matches_direct_error():
    _, _, x, y = planted(4, noise=0.3)
    stats = LinearStats(12, 12).update(x, y)
    coef = fit_ridge(stats, 3.0)
    xa = torch.cat([positions(x), torch.ones(stats.n, 1, dtype=torch.float64)], 1)
    direct = ((xa @ coef - positions(y)) ** 2).sum()
    assert stats.sse(coef) == pytest.approx(float(direct), rel=1e-9)


def test_ridge_shrinks_toward_identity_not_zero():
    _, _, x, y = planted(5, noise=0.5)
    stats = LinearStats(12, 12).update(x, y)
    m = Linear(fixed(1e9)).fit(StatsData(stats))
    assert torch.allclose(m.weight, torch.eye(12), atol=1e-5)
    additive = Additive().fit(StatsData(stats))
    assert torch.allclose(m.bias, additive.delta, atol=1e-4)  # lambda -> inf is the additive map


def test_additive_recovers_a_planted_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, 3, 3, generator=g)
    delta = torch.arange(6.0)
    m = Additive().fit(StatsData(LinearStats(6, 6).update(x, x + delta.view(1, -1, 1, 1))))
    assert torch.allclose(m.delta, delta, atol=1e-5)
    assert m.n_params() == 6


def test_auto_ridge_picks_a_weak_penalty_on_clean_data_and_refits_on_all_photos():
    w, b, x, y = planted(6, noise=1e-3)
    train, val = LinearStats(12, 12).update(x[:20], y[:20]), LinearStats(12, 12).update(x[20:], y[20:])
    m = Linear().fit(StatsData(train, val))
    assert set(m.val_errors) == set(RIDGE_GRID)
    assert m.alpha <= 1e-3
    assert torch.allclose(m.weight.double(), w, atol=1e-3)
    assert m.extra_metrics()["ridge_lambda"] == pytest.approx(m.alpha * train.merged(val).mean_eigenvalue)


def test_auto_ridge_prefers_shrinkage_when_data_is_scarce_and_noisy():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 2, 3, generator=g)  # 12 positions, 40 channels: underdetermined
    y = x + 0.05 + torch.randn(x.shape, generator=g)
    xv = torch.randn(20, 40, 2, 3, generator=g)
    yv = xv + 0.05 + torch.randn(xv.shape, generator=g)
    m = Linear().fit(StatsData(LinearStats(40, 40).update(x, y), LinearStats(40, 40).update(xv, yv)))
    assert m.alpha >= 1.0


def test_singular_least_squares_still_fits():
    x = torch.randn(1, 30, 2, 2)  # 4 positions, 30 channels, lambda 0
    m = Linear(fixed(0.0)).fit(StatsData(LinearStats(30, 30).update(x, x)))
    assert torch.isfinite(m.weight).all()
    assert torch.allclose(m.predict(x), x, atol=1e-3)


def test_identity_and_registry():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(Identity().predict(x), x)
    assert {"identity", "additive", "linear"} <= set(MAPPINGS.names())
    assert get_mapping("linear", fixed(0.5)).options.ridge == 0.5
    with pytest.raises(UnknownNameError, match="known: additive, cnn, identity, linear"):
        get_mapping("transformerr")
    with pytest.raises(ValueError, match="ridge"):
        fixed(-1)
    with pytest.raises(ValueError, match="ridge"):
        fixed("big")
    with pytest.raises(ValueError, match="map size"):
        MapOptions(size="huge")
    with pytest.raises(ValueError, match="validation"):
        Linear().fit(StatsData(LinearStats(3, 3).update(x[:, :3], x[:, :3])))
    with pytest.raises(ValueError, match="stats for 3->3"):
        LinearStats(3, 3).update(torch.randn(2, 4, 2, 2), torch.randn(2, 3, 2, 2))
