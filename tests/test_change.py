"""featmap.score.change on planted maps: every test knows its answer before the code runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import featmap.score.change as change
import featmap.score.geometry as geometry

torch.set_num_threads(1)





def _maps(b=3, c=8, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=torch.float64)


# -- changed positions ----------------------------------------------------------------------------------------

def test_mask_any_pooling_divisible_and_not():
    x = _maps(h=4, w=4)
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[0, 5, 9] = True  # one pixel: cell (1, 2) of 4x4 px cells
    mask[1, 0:8, 0:8] = True  # exactly the top-left 2x2 cells
    got = change.changed_positions(x, x, mask=mask)
    assert got.shape == (3, 16)
    assert got[0].nonzero().flatten().tolist() == [1 * 4 + 2]
    assert got[1].reshape(4, 4)[:2, :2].all() and got[1].sum() == 4
    assert not got[2].any()
    # 10 px onto 3 cells (not divisible): cells cover [0, 4), [3, 7), [6, 10) px; pixel 3 is in cells 0 and 1
    x3 = _maps(b=1, h=3, w=3)
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, 3, 9] = True
    cells = change.changed_positions(x3, x3, mask=m).reshape(3, 3)
    assert cells.nonzero().tolist() == [[0, 2], [1, 2]]


def test_box_mask_matches_the_painted_square():
    m = change.box_mask((0.25, 0.5, 0.5, 0.75), 8, batch=2)
    assert m.shape == (2, 8, 8) and m[0].nonzero()[:, 0].unique().tolist() == [4, 5]
    assert m[0].nonzero()[:, 1].unique().tolist() == [2, 3]


def test_threshold_uses_change_relative_to_the_median_norm():
    x = torch.ones(1, 4, 2, 2, dtype=torch.float64)  # every ||x_p|| = 2
    y = x.clone()
    y[0, 0, 0, 0] += 0.9  # relative change 0.45
    y[0, 0, 1, 1] += 1.1  # relative change 0.55
    got = change.changed_positions(x, y, threshold=0.5)
    assert got.tolist() == [[False, False, False, True]]
    assert change.changed_positions(x, y, threshold=0.4).sum() == 2


# -- cosine over the changed region --------------------------------------------------------------------------

def test_cos_changed_ignores_unchanged_positions():
    true = _maps(b=2, seed=1)
    changed = torch.zeros(2, 36, dtype=torch.bool)
    changed[0, [3, 4, 10]] = True
    changed[1, 20] = True
    pred = true.clone().flatten(2)
    pred[0, :, [3, 4, 10]] = -pred[0, :, [3, 4, 10]]  # only changed cells are wrong (cosine -1)
    pred[1, :, 0] = -pred[1, :, 0]  # an unchanged cell is wrong: must not count
    pred = pred.reshape(true.shape)
    mean, median = change.cos_changed(pred, true, changed)
    assert mean.tolist() == pytest.approx([-1.0, 1.0]) and median.tolist() == pytest.approx([-1.0, 1.0])
    # over the whole map sample 0 would be (33 - 3) / 36: the plain metric dilutes the failure
    whole = torch.nn.functional.cosine_similarity(pred, true, dim=1).flatten(1).mean(1)
    assert float(whole[0]) == pytest.approx(30 / 36)


def test_cos_changed_is_nan_without_changed_positions_and_median_is_the_middle():
    true = _maps(b=2, c=2, h=1, w=4, seed=2)
    pred = true.clone()
    pred[0, :, 0, 1] = torch.tensor([1.0, 0.0]) * true[0, :, 0, 1].norm()
    changed = torch.tensor([[True, True, False, False], [False, False, False, False]])
    mean, median = change.cos_changed(pred, true, changed)
    c1 = torch.nn.functional.cosine_similarity(pred[0, :, 0, 1], true[0, :, 0, 1], dim=0)
    assert float(mean[0]) == pytest.approx((1 + float(c1)) / 2) and float(median[0]) == pytest.approx(float(mean[0]))
    assert np.isnan(float(mean[1])) and np.isnan(float(median[1]))


# -- weight vs bias of the predicted change ----------------------------------------------------------------

def test_delta_shares_planted():
    X = _maps(b=40, c=6, h=1, w=1, seed=3).flatten(1)
    eye = torch.eye(6, dtype=torch.float64)
    b = torch.arange(6, dtype=torch.float64) + 1
    only_bias = geometry.delta_shares(eye, b, X)
    assert only_bias["delta_bias_share"] == pytest.approx(1.0) and only_bias["delta_wx_share"] == pytest.approx(0.0)
    W = eye + 0.3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    only_w = geometry.delta_shares(W, torch.zeros(6, dtype=torch.float64), X)
    assert only_w["delta_wx_share"] == pytest.approx(1.0) and only_w["delta_bias_share"] == pytest.approx(0.0)
    none = geometry.delta_shares(eye, torch.zeros(6, dtype=torch.float64), X)
    assert np.isnan(none["delta_wx_share"]) and np.isnan(none["delta_bias_share"])


# -- effective rank against the shuffled floor -------------------------------------------------------------

def test_ridge_toward_identity_recovers_and_shrinks():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    W = torch.eye(5, dtype=torch.float64) + 0.5 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    W0, b0 = change.ridge_toward_identity(x, x @ W.T + b, 0.0)
    assert torch.allclose(W0, W, atol=1e-8) and torch.allclose(b0, b, atol=1e-8)
    Wbig, bbig = change.ridge_toward_identity(x, x @ W.T + b, 1e9)
    assert torch.allclose(Wbig, torch.eye(5, dtype=torch.float64), atol=1e-4)  # lam -> inf: W = I, the bias free
    assert torch.allclose(bbig, (x @ W.T + b - x).mean(0), atol=1e-3)


def _planted_pairs(rank1: bool, seed: int = 6, b=40, c=24, hw=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, hw, hw, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(b, c, hw, hw, generator=g, dtype=torch.float64)
    if not rank1:
        return x, x + noise
    u, v = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    delta = torch.outer(u, v) / c ** 0.5
    return x, x + torch.einsum("oc,bchw->bohw", delta, x) + noise


def _fitted_erank(x, y, lam):
    W, _ = change.ridge_toward_identity(change.positions(x), change.positions(y), lam)
    return geometry.effective_rank(torch.linalg.svdvals(W - torch.eye(len(W), dtype=W.dtype)))


def test_noise_floor_separates_a_low_rank_change_from_noise():
    for lam in (0.0, 50.0):
        x, y = _planted_pairs(rank1=True)
        floor = change.erank_noise_floor(x, y, lam, n_shuffles=4, seed=0)
        assert floor["delta_erank_floor_frac"] == pytest.approx(floor["delta_erank_floor"] / 24)
        real = _fitted_erank(x, y, lam)
        assert real < 0.5 * floor["delta_erank_floor"], (lam, real, floor)
        x, y = _planted_pairs(rank1=False)
        floor = change.erank_noise_floor(x, y, lam, n_shuffles=4, seed=0)
        real = _fitted_erank(x, y, lam)
        spread = max(floor["delta_erank_floor_max"] - floor["delta_erank_floor_min"], 0.05 * floor["delta_erank_floor"])
        assert abs(real - floor["delta_erank_floor"]) < 2 * spread, (lam, real, floor)


def test_noise_floor_is_seeded_and_takes_any_fit():
    x, y = _planted_pairs(rank1=True, b=10, c=6, hw=2)
    a = change.erank_noise_floor(x, y, 1.0, n_shuffles=3, seed=1)
    assert a == change.erank_noise_floor(x, y, 1.0, n_shuffles=3, seed=1)
    calls = []

    def fit(xp, yp, lam):
        calls.append((xp.shape, lam))
        return torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)

    got = change.erank_noise_floor(x, y, 2.5, fit=fit, n_shuffles=2)
    assert calls == [((40, 6), 2.5)] * 2 and got["delta_erank_floor"] == pytest.approx(6.0)  # W - I = -I


@pytest.mark.parametrize("shuffle", ["change", "target"])
@pytest.mark.parametrize("vectors", [False, True])
def test_noise_floor_shares_the_inputs_scatter_and_equals_the_fit_per_shuffle(shuffle, vectors):
    x, y = _planted_pairs(rank1=True, b=12, c=8, hw=3)
    if vectors:  # (N, C) channel vectors, shuffled across rows
        x, y = change.positions(x), change.positions(y)
    for lam in (0.0, 3.0):
        shared = change.erank_noise_floor(x, y, lam, n_shuffles=3, seed=2, shuffle=shuffle)
        each = change.erank_noise_floor(x, y, lam, fit=lambda a, b, s: change.ridge_toward_identity(a, b, s),
                                        n_shuffles=3, seed=2, shuffle=shuffle)  # not the default: fit per shuffle
        assert shared == pytest.approx(each, rel=1e-9, abs=1e-9), lam
        assert shared["delta_erank_floor_sd"] > 0  # the shuffles differ: a floor of one repeated fit would not


# -- grid alignment -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [(1, 0), (0, -1), (-1, 1), (0, 0)])
def test_grid_alignment_recovers_a_planted_shift(shift):
    g = _maps(b=2, c=16, h=9, w=9, seed=7)
    y = torch.roll(g, shifts=shift, dims=(2, 3))  # y[i] = g[i - dy]: content moved by (dy, dx)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    dy, dx = shift  # the cells torch.roll wrapped in hold no shifted content: make them noise
    wrapped = torch.zeros(9, 9, dtype=torch.bool)
    wrapped[:dy] = dy > 0
    wrapped[9 + dy:] = dy < 0
    wrapped[:, :dx] = wrapped[:, :dx] | (dx > 0)
    wrapped[:, 9 + dx:] = wrapped[:, 9 + dx:] | (dx < 0)
    y = torch.where(wrapped, noise, y)
    own = change.grid_alignment(g, y, max_shift=1, subcell=False, common=False)  # each shift on its own overlap
    assert own.best_shift == shift and own.best_score == pytest.approx(1.0)
    res = change.grid_alignment(g, y, max_shift=1, subcell=True)
    assert res.best_shift == shift and res.best_score == pytest.approx(1.0)
    assert res.plain_is_best == (shift == (0, 0))
    assert res.subcell_offset == pytest.approx(shift) and res.subcell_score == pytest.approx(1.0)
    assert len(res.scores) == 9 and res.per_sample.shape == (2, 9)


def test_grid_alignment_finds_a_half_cell_offset_and_compares_only_the_overlap():
    r = torch.arange(9, dtype=torch.float64).view(9, 1)

    def field(c):  # a smooth 3-channel map, sampled at rows r and (fractional) columns c
        c = c.view(1, -1)
        return torch.stack([torch.cos(0.4 * r + 0.3 * c), torch.sin(0.4 * r + 0.3 * c), 1 + 0.05 * r - 0.05 * c])[None]

    cols = torch.arange(9, dtype=torch.float64)
    g, y = field(cols), field(cols + 0.5)  # y[i, j] = g at column j + 0.5: moved half a cell left
    res = change.grid_alignment(g, y, max_shift=1, subcell=True, step=0.25)
    assert res.subcell_offset == pytest.approx((0.0, -0.5))
    # shifting with wrap-around would compare the border with the far side; the overlap-only score at (0, 1)
    # never reads a wrapped cell, so its value equals a direct computation on the common cells
    r0, r1, c0, c1 = res.region
    direct = torch.nn.functional.cosine_similarity(g[..., r0:r1, c0 - 1:c1 - 1], y[..., r0:r1, c0:c1], dim=1).mean()
    assert res.scores[(0, 1)] == pytest.approx(float(direct))
    own = change.grid_alignment(g, y, max_shift=1, subcell=False, common=False)
    direct = torch.nn.functional.cosine_similarity(g[..., :, :-1], y[..., :, 1:], dim=1).mean()
    assert own.scores[(0, 1)] == pytest.approx(float(direct))


def test_grid_alignment_rejects_a_grid_too_small():
    with pytest.raises(ValueError, match="max_shift"):
        change.grid_alignment(_maps(h=2, w=2), _maps(h=2, w=2), max_shift=1)


def test_grid_alignment_on_real_features_of_the_default_backbone(photo_dir):
    """TF-SAME stride-2 padding is asymmetric: at blocks.0 the mirrored grid is off by a cell; from blocks.2 on the
    plain mirror lines up (measured on 20 photos; here on 8)."""
    import numpy as np

    from featmap.data.images import ImageSet, View
    from featmap.edits.manipulations import get_manipulation
    from featmap.features.backbone import Backbone

    torch.set_num_threads(1)
    backbone = Backbone("tf_efficientnet_lite0", ["blocks.0", "blocks.2", "blocks.4"])
    pre = backbone.preprocessing
    images = ImageSet.from_spec(str(photo_dir), False, None, 0)
    originals = np.stack([ImageSet.view(View(p), pre.size, pre.interpolation, pre.crop_pct, 0) for p in images.photos])
    mirror = get_manipulation("mirror_h")
    edited = np.stack([mirror(img, 0, str(i)) for i, img in enumerate(originals)])
    x, y = backbone.features(originals), backbone.features(edited)
    shallow = change.grid_alignment(mirror.grid_op(x["blocks.0"]), y["blocks.0"])
    assert not shallow.plain_is_best and shallow.best_score > shallow.plain_score + 0.02
    for layer in ("blocks.2", "blocks.4"):
        deep = change.grid_alignment(mirror.grid_op(x[layer]), y[layer])
        assert deep.plain_is_best, (layer, deep.best_shift)


def test_grid_alignment_scores_equal_the_direct_shift_and_cosine():
    """The shared dot products (bilinear is linear in the map) give the direct computation's scores: every copy
    moved by grid_sample, then the position cosine, for integer and sub-cell offsets, shifts of 1 and 2."""
    from featmap.score import change

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 5, 9, 8, generator=gen, dtype=torch.float64)
    y = g.roll(1, 2) + 0.3 * torch.randn(3, 5, 9, 8, generator=gen, dtype=torch.float64)
    for m in (1, 2):
        fast = change._CommonRegionScores(g, y, m)
        region = change._region(9, 8, m, True, 0, 0)
        for dy, dx in [(0, 0), (1, 0), (-m, m), (0.25, -0.75), (-1.5 if m == 2 else -0.5, 0.5)]:
            direct = change._score(change._shifted(g, dy, dx), y, region)
            assert torch.allclose(fast.score(dy, dx), direct, atol=1e-12), (m, dy, dx)
    assert change.grid_alignment(g, y).best_shift == (1, 0)  # y is g moved one cell down
