"""Per-sample pieces of feature space that look at the change an edit makes: which positions it changed, the
cosine over those positions only, how a linear map's predicted change splits into weight and bias parts, the
effective rank of W - I against a shuffled-pairs noise floor, and how well a grid operation lines up with the
edited image's true feature map (integer and sub-cell shifts).

Maps are (B, C, H, W); channel vectors at positions are (N, C).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from featmap.core.seeding import rng_for
from featmap.maps.stats import LinearStats, fit_ridge, positions
from featmap.score.geometry import effective_rank

# A position counts as changed (no edit mask given) when ||y_p - x_p|| exceeds this share of the sample's median
# ||x_p||. Measured on tf_efficientnet_lite0 (20 foolbox photos at 224 px, blocks.1-6) with the four painted
# squares, against each square's own mask mapped to the grid: 0.5 keeps 96-100% of the masked cells at every
# layer, with 2-3% false cells at blocks.1-3, 7% at blocks.4 and 10-21% at blocks.5-6 (the receptive field
# spreads the change); balanced accuracy, mean over masks and layers, is 0.952 at 0.5 and 0.6, 0.938 at 0.4,
# 0.927 at 0.75, 0.845 at 1.0 (0.75 loses 21-31% of the masked cells at blocks.5-6). Global edits change most
# positions by about this much: grayscale and hue_shift_60 median 0.41-0.54, noise_40 0.83-1.01.
DEFAULT_CHANGE_THRESHOLD = 0.5


def _check_maps(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"{what} takes two (B, C, H, W) maps of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def box_mask(box: tuple[float, float, float, float], size: int, batch: int = 1) -> torch.Tensor:
    """Returns a (batch, size, size) bool mask of a square edit given as (x0, y0, x1, y1) fractions of the side.

    The pixel rounding is the one the masking manipulations paint with: rows round(y0 S) to
    max(round(y1 S), round(y0 S) + 1), columns likewise (end exclusive).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
    out = torch.zeros(batch, size, size, dtype=torch.bool)
    r0, c0 = round(y0 * size), round(x0 * size)
    out[:, r0:max(round(y1 * size), r0 + 1), c0:max(round(x1 * size), c0 + 1)] = True
    return out


def mask_to_grid(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Returns (B, height*width) bool: a grid cell is True when any pixel of it lies in the (B, S, S') image mask.

    Cells are S / height pixels tall (S' / width wide); where that is not an integer, adaptive max pooling gives
    each cell the pixels from floor(i S / H) to ceil((i + 1) S / H), so a pixel on a cell border counts for both.
    """
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"masks must be (B, S, S) or (S, S), got shape {tuple(mask.shape)}")
    if mask.shape[1] < height or mask.shape[2] < width:
        raise ValueError(f"a {tuple(mask.shape[1:])} mask is coarser than the {height}x{width} grid")
    pooled = F.adaptive_max_pool2d(mask.to(torch.float32)[:, None], (height, width))
    return (pooled[:, 0] > 0).flatten(1)


def relative_change(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Returns (B, H*W) float64: ||y_p - x_p|| / median_p ||x_p||, the median over the sample's positions.

    A sample whose median ||x_p|| is 0 (an all-zero map) is divided by 1e-12 instead.
    """
    _check_maps(x, y, "relative_change")
    x, y = x.double(), y.double()
    change = (y - x).norm(dim=1).flatten(1)
    scale = x.norm(dim=1).flatten(1).quantile(0.5, dim=1, keepdim=True).clamp_min(1e-12)
    return change / scale


def changed_positions(x: torch.Tensor, y: torch.Tensor, threshold: float = DEFAULT_CHANGE_THRESHOLD,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Returns (B, H*W) bool: the positions the edit changed, from its mask when given, else from the true change.

    ``x``: the original map as the maps see it (for geometric edits: after the grid operation), ``y``: the true
    map of the edited image, both (B, C, H, W). With ``mask`` ((B, S, S) or (S, S) bool, the edit's own object
    mask or painted square in image pixels) a cell is changed when any pixel of it is in the mask (see
    ``mask_to_grid``); ``x``, ``y`` then give only the grid size. Without a mask, position p of a sample is
    changed when ||y_p - x_p|| / median_p ||x_p|| > ``threshold`` (``relative_change``).

    Default threshold 0.5 (``DEFAULT_CHANGE_THRESHOLD``, measured there): on the default backbone it reproduces
    the painted squares' own masks best (balanced accuracy 0.95 over blocks.1-6; 96-100% of the masked cells,
    2-21% extra cells, most at the deepest stages). The set depends on the true pair only, never on a
    prediction, so every map (identity included) is scored on the same positions.
    """
    _check_maps(x, y, "changed_positions")
    if mask is not None:
        got = mask_to_grid(mask, x.shape[2], x.shape[3])
        if got.shape[0] == 1 and x.shape[0] > 1:
            got = got.expand(x.shape[0], -1)
        if got.shape[0] != x.shape[0]:
            raise ValueError(f"{got.shape[0]} masks for {x.shape[0]} samples")
        return got.clone()
    if not threshold >= 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold}")
    return relative_change(x, y) > threshold


def cos_changed(pred: torch.Tensor, true: torch.Tensor, changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per sample (mean, median) of the position cosines over the changed positions only, float64 (B,).

    Cosine between predicted and true channel vectors at each position (eps 1e-8, as ``cos_mean``); the median
    of an even count is the mean of the two middle values. A sample with no changed position gets NaN in both:
    callers drop those samples and report how many remain (n). ``changed``: (B, H*W) bool from
    ``changed_positions``.
    """
    _check_maps(pred, true, "cos_changed")
    b, _, h, w = pred.shape
    changed = torch.as_tensor(changed, dtype=torch.bool)
    if changed.shape != (b, h * w):
        raise ValueError(f"changed must be (B, H*W) = {(b, h * w)}, got {tuple(changed.shape)}")
    cos = F.cosine_similarity(pred.double(), true.double(), dim=1, eps=1e-8).flatten(1)
    count = changed.sum(1)
    mean = torch.where(changed, cos, torch.zeros_like(cos)).sum(1) / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    median = torch.where(changed, cos, torch.full_like(cos, float("nan"))).nanquantile(0.5, dim=1)
    return mean, median


def ridge_toward_identity(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (W (C, C), b (C,)) minimising ||X W^T + 1 b^T - Y||^2 + lam ||W - I||^2, the bias unpenalised: the
    shared linear map's own fit (``maps.stats.fit_ridge``) on channel vectors x, y (N, C); ``lam`` is absolute."""
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"ridge_toward_identity takes x, y (N, C) of equal shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    stats = LinearStats(x.shape[1], y.shape[1]).update(x[:, :, None, None], y[:, :, None, None])
    coef = fit_ridge(stats, float(lam))
    return coef[:-1].T.contiguous(), coef[-1].contiguous()


FitFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class _ShuffledRidge:
    """The default fit of ``erank_noise_floor``'s shuffles, from statistics that do not change between them.

    With x (B, C, P) per sample and t the shuffled term (the change y - x, or the target y), a shuffle pairs sample
    i with t of sample p(i): [x,1]^T y' = [x,1]^T x + sum_i [x_i,1]^T t_p(i) (change), or the second term alone
    (target). [x,1]^T [x,1] and the first term are computed once; a shuffle adds B products of (C, P) blocks, with
    no shuffled copy of the maps and no position-major copy: on one thread, five shuffles of 60 Lite0 blocks.0 maps
    (16 x 112 x 112) 0.96 -> 0.24 s, of blocks.6 maps (320 x 7 x 7) 0.18 -> 0.16 s. Equal to
    ``ridge_toward_identity`` on the shuffled positions up to float64 rounding (tested)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shuffle: str):
        b, c = x.shape[:2]
        self.x = x.reshape(b, c, -1).double()  # (B, C, P): a sample's channel vectors, as the map holds them
        y = y.reshape(b, c, -1).double()
        self.t = y - self.x if shuffle == "change" else y
        self.c, self.n = c, b * self.x.shape[2]
        self.t_sum = self.t.sum((0, 2))  # the same for every shuffle: a shuffle permutes the samples
        self.xtx = torch.empty(c + 1, c + 1, dtype=torch.float64)
        self.xtx[:c, :c] = self._cross(self.x, torch.arange(b))
        self.xtx[:c, c] = self.xtx[c, :c] = self.x.sum((0, 2))
        self.xtx[c, c] = self.n
        self.base = self.xtx[:, :c] if shuffle == "change" else torch.zeros(c + 1, c, dtype=torch.float64)

    def _cross(self, t: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """Returns sum_i x_i t_partner(i)^T, (C, C)."""
        if self.x.shape[2] == 1:  # (N, C) vectors: one product
            return self.x[:, :, 0].T @ t[partner, :, 0]
        out = torch.zeros(self.c, self.c, dtype=torch.float64)
        for i, j in enumerate(partner.tolist()):
            out.addmm_(self.x[i], t[j].T)
        return out

    def __call__(self, partner: torch.Tensor, lam: float) -> torch.Tensor:
        """Returns W (C, C) fit on the pairs (x_i, x_i + t_partner(i)) (change) or (x_i, t_partner(i)) (target);
        ``partner`` is a permutation of the samples."""
        xty = self.base.clone()
        xty[:self.c] += self._cross(self.t, partner)
        xty[self.c] += self.t_sum
        stats = LinearStats(self.c, self.c)
        stats.xtx, stats.xty, stats.n = self.xtx, xty, self.n
        return fit_ridge(stats, float(lam))[:-1].T


def erank_noise_floor(x: torch.Tensor, y: torch.Tensor, alpha_abs: float, fit: FitFn = ridge_toward_identity,
                      n_shuffles: int = 5, seed: int = 0, shuffle: str = "change") -> dict[str, float]:
    """Returns the effective rank of W - I fit on shuffled pairs: mean, sd, min, max over shuffles, and /C.

    The noise floor of ``delta_erank``: what the same fit at the same absolute ridge strength ``alpha_abs``
    gives when the pairs carry no x -> change relation. x, y: the maps the real fit used, (B, C, H, W), shuffled
    across samples (a random cyclic derangement, so no sample keeps its own partner, positions kept); or (N, C)
    vectors, shuffled across rows. ``fit(x_positions (N, C), y_positions (N, C), lam) -> (W, b)``.

    ``shuffle="change"`` (default): y_i' = x_i + (y_j - x_j), each original gets another sample's change. The
    changes keep their distribution (mean, spread, spatial layout) but are unrelated to x, so W - I is pure
    estimation noise shaped by the ridge: an edit whose change is noise lands at the floor, a structured one
    below it. ``shuffle="target"``: y_i' = y_j (the whole target permuted); its W - I is close to -I at small
    alpha, so the floor sits near C and says little about noise. Keys: ``delta_erank_floor`` (mean),
    ``delta_erank_floor_sd``, ``delta_erank_floor_min``, ``delta_erank_floor_max``, the same four with ``_frac``
    (divided by C), and ``n_shuffles``. Draws are seeded by (seed, "erank_noise_floor", k).
    """
    if shuffle not in ("change", "target"):
        raise ValueError(f"shuffle must be 'change' or 'target', got {shuffle!r}")
    if x.shape != y.shape or x.ndim not in (2, 4):
        raise ValueError(f"erank_noise_floor takes x, y of equal shape, (B, C, H, W) or (N, C); got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}")
    if len(x) < 2 or n_shuffles < 1:
        raise ValueError(f"a shuffled floor needs at least 2 samples and 1 shuffle, got {len(x)} and {n_shuffles}")
    c = x.shape[1]
    shared = _ShuffledRidge(x, y, shuffle) if fit is ridge_toward_identity else None
    if shared is None:
        x, y = x.double(), y.double()
        xp = positions(x) if x.ndim == 4 else x
    values = []
    for k in range(n_shuffles):
        order = torch.as_tensor(rng_for(seed, "erank_noise_floor", k).permutation(len(x)))
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)  # sample order[i] takes order[i + 1]: a derangement
        if shared is not None:
            W = shared(partner, float(alpha_abs))
        else:
            y_new = y[partner] if shuffle == "target" else x + (y[partner] - x[partner])
            W, _ = fit(xp, positions(y_new) if x.ndim == 4 else y_new, float(alpha_abs))
        values.append(effective_rank(torch.linalg.svdvals(W.double() - torch.eye(c, dtype=torch.float64))))
    v = np.array(values)
    stats = {"": float(v.mean()), "_sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
             "_min": float(v.min()), "_max": float(v.max())}
    out = {f"delta_erank_floor{k}": s for k, s in stats.items()}
    out.update({f"delta_erank_floor_frac{k}": s / c for k, s in stats.items()})
    out["n_shuffles"] = float(n_shuffles)
    return out


# -- grid alignment ------------------------------------------------------------------------------------------

@dataclass
class Alignment:
    """How a grid operation on f(x) lines up with f(edit(x)); see ``grid_alignment``."""

    scores: dict[tuple[int, int], float]  # integer shift (dy, dx) -> mean position cosine
    per_sample: np.ndarray  # (B, len(scores)) in the order of ``scores``
    best_shift: tuple[int, int]
    best_score: float
    plain_score: float
    subcell_offset: tuple[float, float] = (float("nan"), float("nan"))
    subcell_score: float = float("nan")
    subcell_scores: dict[tuple[float, float], float] = field(default_factory=dict)
    n: int = 0
    region: tuple[int, int, int, int] = (0, 0, 0, 0)  # rows r0:r1, columns c0:c1 of y scored (common region)

    @property
    def plain_is_best(self) -> bool:
        """Returns whether no integer shift scores above the plain operation (shift (0, 0))."""
        return self.best_shift == (0, 0)

    def metrics(self) -> dict[str, float]:
        """Returns flat results-table metrics: align_cos_plain, align_cos_best, align_best_dy, align_best_dx,
        align_plain_is_best (1/0), align_subcell_dy, align_subcell_dx, align_cos_subcell."""
        return {"align_cos_plain": self.plain_score, "align_cos_best": self.best_score,
                "align_best_dy": float(self.best_shift[0]), "align_best_dx": float(self.best_shift[1]),
                "align_plain_is_best": float(self.plain_is_best), "align_subcell_dy": float(self.subcell_offset[0]),
                "align_subcell_dx": float(self.subcell_offset[1]), "align_cos_subcell": self.subcell_score}


def _region(h: int, w: int, m: int, common: bool, dy: float, dx: float) -> tuple[int, int, int, int]:
    if common:
        return m, h - m, m, w - m
    return (max(0, math.ceil(dy)), h + min(0, math.floor(dy)), max(0, math.ceil(dx)), w + min(0, math.floor(dx)))


def _shifted(g: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """Returns s with s[..., i, j] = g[..., i - dy, j - dx], bilinear between cells; outside the grid is zero
    (only ever read inside the overlap)."""
    b, _, h, w = g.shape
    if float(dy).is_integer() and float(dx).is_integer():
        dy, dx = int(dy), int(dx)
        out = torch.zeros_like(g)
        out[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
            g[..., max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
        return out
    rows = (torch.arange(h, dtype=g.dtype) - dy) * 2 / (h - 1) - 1
    cols = (torch.arange(w, dtype=g.dtype) - dx) * 2 / (w - 1) - 1
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1)  # (h, w, 2) as (x, y)
    return F.grid_sample(g, grid.expand(b, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True)


def _score(s: torch.Tensor, y: torch.Tensor, region: tuple[int, int, int, int]) -> torch.Tensor:
    r0, r1, c0, c1 = region
    return F.cosine_similarity(s[..., r0:r1, c0:c1], y[..., r0:r1, c0:c1], dim=1, eps=1e-8).flatten(1).mean(1)


class _CommonRegionScores:
    """The mean position cosines of ``_score(_shifted(g, dy, dx), y, region)`` for any offsets with |dy|, |dx| <= m
    on the common region (margin m), from channel dot products of integer-shifted copies computed once.

    Bilinear interpolation is linear: inside the region, the copy moved by (dy, dx) is a weighted sum of at most
    four integer-shifted copies g_u (g_u[i, j] = g[i - u_y, j - u_x]), so its dot product with y and its squared
    norm are weighted sums of the dot maps g_u . y and g_u . g_v (u, v neighbours), each a channel reduction done
    once instead of once per offset. Equal to the direct computation up to round-off."""

    def __init__(self, g: torch.Tensor, y: torch.Tensor, m: int):
        h, w = g.shape[2:]
        self.m, self.region = m, (m, h - m, m, w - m)
        r0, r1, c0, c1 = self.region
        self._g, self._y = g, y[..., r0:r1, c0:c1]
        self.y_norm = self._y.norm(dim=1).clamp_min(1e-8)
        self._dots: dict = {}

    def _copy(self, u):
        r0, r1, c0, c1 = self.region
        return self._g[..., r0 - u[0]:r1 - u[0], c0 - u[1]:c1 - u[1]]

    def _dot(self, u, v=None):
        """Returns the channel dot map of copy u with copy v, or with y (v None)."""
        key = (u, v) if v is None or u <= v else (v, u)
        if key not in self._dots:
            other = self._y if v is None else self._copy(v)
            self._dots[key] = (self._copy(u) * other).sum(1)
        return self._dots[key]

    @staticmethod
    def _weights(d: float) -> list[tuple[int, float]]:
        low = math.floor(d)
        frac = d - low
        return [(low, 1.0)] if frac == 0 else [(low, 1 - frac), (low + 1, frac)]

    def score(self, dy: float, dx: float) -> torch.Tensor:
        """Returns the per-sample mean position cosine of the copy moved by (dy, dx) against y."""
        parts = [((a, b), wa * wb) for a, wa in self._weights(dy) for b, wb in self._weights(dx)]
        num = sum(wt * self._dot(u) for u, wt in parts)
        sq = sum(wu * wv * self._dot(u, v) for u, wu in parts for v, wv in parts)
        cos = num / (sq.clamp_min(0).sqrt().clamp_min(1e-8) * self.y_norm)
        return cos.flatten(1).mean(1)


def grid_alignment(grid_op_x: torch.Tensor, y: torch.Tensor, max_shift: int = 1, subcell: bool = True,
                   step: float = 0.25, common: bool = True) -> Alignment:
    """Returns the mean position cosine between the grid-operated original shifted by every (dy, dx) and the true
    map, with the best integer shift, the plain (0, 0) score and the best sub-cell offset.

    ``grid_op_x``: the grid operation applied to the original's map, ``y``: the map of the edited image, both
    (B, C, H, W). Shift (dy, dx) compares y[i, j] with grid_op_x[i - dy, j - dx] (content moved dy cells down,
    dx right): if y is grid_op_x moved one cell down, the best shift is (1, 0). No wrap-around: only cells where
    both maps exist are compared; with ``common`` (default) every shift is scored on the same cells of y, rows and
    columns max_shift .. size - max_shift - 1, so shifts differ only by the shift; else each on its own overlap.
    Score = mean over those cells of the channel-vector cosine, then mean over samples. ``subcell``: also
    offsets on a ``step`` grid in [-max_shift, max_shift]^2, moved by bilinear interpolation (grid_sample,
    align_corners=True), on the common cells. Ties go to the smaller shift (the plain operation first).
    """
    _check_maps(grid_op_x, y, "grid_alignment")
    g, y = grid_op_x.double(), y.double()
    h, w = g.shape[2:]
    m = int(max_shift)
    if m < 0 or h < 2 * m + 1 or w < 2 * m + 1:
        raise ValueError(f"a {h}x{w} grid has no cells left after shifts of up to {m}; use a smaller max_shift")
    shifts = sorted(((dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)),
                    key=lambda s: (abs(s[0]) + abs(s[1]), s))
    fast = _CommonRegionScores(g, y, m) if common else None
    per = torch.stack([fast.score(dy, dx) if fast else _score(_shifted(g, dy, dx), y, _region(h, w, m, common, dy, dx))
                       for dy, dx in shifts], 1)
    means = per.mean(0)
    scores = {s: float(v) for s, v in zip(shifts, means)}
    best = shifts[int(torch.argmax(means))]  # argmax returns the first maximum: ties go to the smaller shift
    out = Alignment(scores=scores, per_sample=per.numpy(), best_shift=best, best_score=scores[best],
                    plain_score=scores[(0, 0)], n=len(g), region=_region(h, w, m, True, 0, 0))
    if subcell:
        k = round(m / step)
        offsets = sorted(((i * step, j * step) for i in range(-k, k + 1) for j in range(-k, k + 1)),
                         key=lambda s: (abs(s[0]) + abs(s[1]), s))
        fast = fast or _CommonRegionScores(g, y, m)
        sub = {o: float(fast.score(*o).mean()) for o in offsets}
        best_o = max(offsets, key=lambda o: (sub[o], -offsets.index(o)))
        out.subcell_scores, out.subcell_offset, out.subcell_score = sub, best_o, sub[best_o]
    return out
