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


def test_every_table_metric_has_its_direction_in_the_registry():
    from featmap.score.metrics import higher_is_better

    assert [higher_is_better(m) for m in ("cos_mean", "rel_err", "jsd", "top1_agree", "top5_acc", "ssim", "lpips",
                                          "st_lpips", "cos_reextract_median")] == \
        [True, False, False, True, True, True, False, False, True]
    assert higher_is_better("st_lpips_vs_inv_target") is False and higher_is_better("jsd_gap_transformer") is False
    assert higher_is_better("cos_mean_gap_transformer_pe") is True
    with pytest.raises(KeyError, match="unknown metric 'cos_meen'"):
        higher_is_better("cos_meen")


def test_the_closeness_rule_follows_the_metric_direction():
    """A gap of linear minus global is turned by the metric's direction: +0.03 bits of JSD is a loss for linear,
    +0.03 of cosine a gain."""
    import pandas as pd

    from featmap.report.verdicts import closeness

    base = {"family": "masking", "manipulation": "m", "backbone": "b", "layer": "l", "spatial": "none",
            "mapping": "linear", "n": 40}
    rows = pd.DataFrame([{**base, "metric": f"{m}_gap_transformer", "value": 0.03, "ci_low": 0.02, "ci_high": 0.04}
                         for m in ("jsd", "cos_mean")])
    jsd = closeness(rows, "jsd", 0.01).cases.iloc[0]
    cos = closeness(rows, "cos_mean", 0.01).cases.iloc[0]
    assert (jsd["gap"], jsd["outcome"]) == (-0.03, "does not hold")
    assert (cos["gap"], cos["outcome"]) == (0.03, "holds")


def test_position_cosines_are_torchs_cosines_in_float64():
    pred, true = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    true[1, :, 2, 2] = 0  # a zero vector: cosine 0
    ours = position_cosines(pred, true)
    theirs = torch.nn.functional.cosine_similarity(pred.double(), true.double(), dim=1, eps=1e-8).flatten(1)
    assert ours.dtype == torch.float64 and ours.shape == (3, 16) and ours[1, 10] == 0
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_a_maps_agreement_and_accuracy_run_the_tail_once_and_never_serve_another_prediction():
    from pathlib import Path

    from featmap.data.images import Photo, View
    from featmap.score.semantic import SemanticScorer

    calls = []
    head = torch.nn.Linear(6, 10).double().requires_grad_(False)

    def tail(maps):
        calls.append(len(maps))
        return head(maps.mean((2, 3)))

    views = [View(Photo(f"p{i}", Path(f"p{i}.jpg"), "test", f"imagenet_{i % 10}", "", "")) for i in range(5)]
    g = torch.Generator().manual_seed(0)
    y, pred = torch.randn(5, 6, 2, 2, generator=g, dtype=torch.float64), torch.randn(5, 6, 2, 2, generator=g,
                                                                                   dtype=torch.float64)
    scorer = SemanticScorer(tail, y, views, batch=2)
    base = dict(family="f", manipulation="m", backbone="b", layer="l", spatial="none", mapping="m")
    assert calls == [2, 2, 1]  # the true map's probabilities
    fresh = SemanticScorer(lambda m: head(m.mean((2, 3))), y, views, batch=2)
    agree = scorer.agreement(pred)
    rows = scorer.accuracy_rows(base, pred, 50, 0)
    assert calls == [2, 2, 1] * 2  # the same prediction's two scores: one pass of the tail
    assert {k: v.tolist() for k, v in agree.items()} == {k: v.tolist() for k, v in fresh.agreement(pred).items()}
    assert rows == fresh.accuracy_rows(base, pred, 50, 0)
    other = pred.clone()  # equal content, another tensor: computed again, never assumed equal
    scorer.accuracy_rows(base, other, 50, 0)
    assert calls == [2, 2, 1] * 3
    other.mul_(-1)
    assert scorer.agreement(pred)["jsd"].tolist() == fresh.agreement(pred)["jsd"].tolist()
    assert calls == [2, 2, 1] * 4
