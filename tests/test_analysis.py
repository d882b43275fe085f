"""Planted answers for the linear-map analysis and the semantic metrics."""
import pytest
import torch

from featmap.score.geometry import (
    effective_rank,
    spectrum_metrics,
    truncate,
    weight_bias_shares,
)
from featmap.score.metrics import class_probabilities, jsd, top1_agree, topk_correct


@pytest.mark.parametrize("c", [1, 7, 64])
def test_effective_rank_of_the_identity_is_c(c):
    s = torch.linalg.svdvals(torch.eye(c))
    assert effective_rank(s, "roy") == pytest.approx(c)
    assert effective_rank(s, "energy") == pytest.approx(c)


def test_effective_rank_of_rank_one_is_one_and_conventions_differ():
    g = torch.Generator().manual_seed(0)
    w = torch.outer(torch.randn(9, generator=g), torch.randn(9, generator=g))
    s = torch.linalg.svdvals(w.double())
    assert effective_rank(s, "roy") == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(s, "energy") == pytest.approx(1.0, abs=1e-6)
    decaying = torch.tensor([4.0, 2.0, 1.0])
    assert effective_rank(decaying, "energy") < effective_rank(decaying, "roy") < 3
    with pytest.raises(ValueError, match="convention"):
        effective_rank(decaying, "shannon")


def test_weight_bias_shares_of_pure_bias_and_bias_free_maps():
    x = torch.randn(100, 6)
    pure_bias = weight_bias_shares(torch.zeros(6, 6), torch.ones(6), x)
    assert pure_bias["bias_share"] == pytest.approx(1.0) and pure_bias["wx_share"] == pytest.approx(0.0)
    no_bias = weight_bias_shares(torch.randn(6, 6), torch.zeros(6), x)
    assert no_bias["wx_share"] == pytest.approx(1.0) and no_bias["bias_share"] == pytest.approx(0.0)
    assert no_bias["cos_wx_full"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="C_out, C_in"):
        weight_bias_shares(torch.zeros(6, 5), torch.ones(6), x)


def test_rank_k_truncation_of_a_planted_rank_k_map_loses_nothing():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(3, 20, generator=g, dtype=torch.float64)
    w = a @ b
    assert torch.allclose(truncate(w, 3), w, atol=1e-10)
    assert not torch.allclose(truncate(w, 2), w, atol=1e-3)
    eye = torch.eye(20, dtype=torch.float64)
    assert torch.allclose(truncate(eye + w, 3, around=eye), eye + w, atol=1e-10)  # W - I has rank 3


def test_spectrum_of_an_orthogonal_map_is_an_isometry():
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    m = spectrum_metrics(q)
    assert m["rank"] == 16 and m["erank_frac"] == pytest.approx(1.0) and m["isometry_rms"] == pytest.approx(0, abs=1e-9)
    assert m["spectral_norm"] == pytest.approx(1.0) and m["top1_energy"] == pytest.approx(1 / 16)


def test_jsd_and_agreement():
    p = class_probabilities(torch.randn(5, 10))
    assert torch.allclose(jsd(p, p), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert jsd(a, b).item() == pytest.approx(1.0, abs=1e-6)  # disjoint: 1 bit, and no NaN from the zeros
    assert top1_agree(p, p).sum() == 5
    labels = p.argmax(1)
    assert topk_correct(p, labels, 1).sum() == 5 and topk_correct(p, (labels + 1) % 10, 10).sum() == 5
