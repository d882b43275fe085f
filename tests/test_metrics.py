import numpy as np
import pytest
import torch

from featmap.core.bootstrap import bootstrap_ci
from featmap.score.metrics import (
    METRICS,
    cos_mean,
    cos_median,
    position_cosines,
    rel_err,
)


def test_cosines_of_known_pairs():
    x = torch.randn(3, 8, 4, 5)
    assert torch.allclose(cos_mean(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cos_mean(-x, x), -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cos_mean(2.5 * x, x), torch.ones(3, dtype=torch.float64))  # scale invariant
    assert position_cosines(x, x).shape == (3, 20)


def test_median_and_mean_over_positions():
    true = torch.zeros(1, 2, 1, 4)
    true[:, 0] = 1.0
    pred = torch.zeros(1, 2, 1, 4)
    pred[0, 0] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    pred[0, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # cosines 1, 1, 1, 0
    assert cos_mean(pred, true).item() == pytest.approx(0.75)
    assert cos_median(pred, true).item() == pytest.approx(1.0)
    pred[0, 0, 0, 1], pred[0, 1, 0, 1] = 0.0, 1.0  # cosines 1, 0, 1, 0: median of an even count is 0.5
    assert cos_median(pred, true).item() == pytest.approx(0.5)


def test_relative_error():
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(rel_err(x, x), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(rel_err(1.5 * x, x), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(rel_err(torch.zeros_like(x), x), torch.ones(2, dtype=torch.float64))


def test_metric_metadata_and_shape_errors():
    assert METRICS.get("cos_mean").higher_is_better and not METRICS.get("rel_err").higher_is_better
    with pytest.raises(ValueError, match="equal shape"):
        cos_mean(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


def test_bootstrap_interval_is_seeded_contains_the_mean_and_narrows():
    values = np.random.default_rng(0).normal(0.5, 0.1, 50)
    lo, hi = bootstrap_ci(values, 2000, seed=1)
    assert (lo, hi) == bootstrap_ci(values, 2000, seed=1)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * values.std() / np.sqrt(50), rel=0.2)
    many = np.random.default_rng(0).normal(0.5, 0.1, 800)
    lo2, hi2 = bootstrap_ci(many, 2000, seed=1)
    assert hi2 - lo2 < (hi - lo) / 2
    assert np.isnan(bootstrap_ci(np.array([0.3]))[0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.array([]))
