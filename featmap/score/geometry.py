"""What a fitted linear map y = W x + b looks like: weight vs bias dominance, spectrum, rank-k truncation."""
from __future__ import annotations

import torch


def effective_rank(singular_values: torch.Tensor, convention: str = "roy") -> float:
    """Returns exp(entropy) of the normalised singular values.

    ``roy`` (Roy and Vetterli, 2007): p_i = s_i / sum s. ``energy`` (the reference code): p_i = s_i^2 / sum s^2.
    The identity of size C has effective rank C under both; a rank-1 matrix has 1.
    """
    if convention not in ("roy", "energy"):
        raise ValueError(f"convention must be 'roy' or 'energy', got {convention!r}")
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    if s.ndim != 1 or len(s) == 0 or (s < 0).any():
        raise ValueError("effective_rank takes a non-empty 1-D tensor of non-negative singular values")
    w = s if convention == "roy" else s ** 2
    if w.sum() == 0:
        return 0.0
    p = w / w.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def weight_bias_shares(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> dict[str, float]:
    """Returns ``wx_share``, ``bias_share`` and ``cos_wx_full`` of y = W x + b over feature vectors X.

    W: (C_out, C_in), b: (C_out,), X: (N, C_in). With W x computed WITHOUT the bias (the reference code
    added it twice): wx_share = median_n ||W x_n|| / median_n ||W x_n + b||, bias_share = ||b|| / median_n
    ||W x_n + b||, cos_wx_full = median_n cos(W x_n, W x_n + b).
    """
    if W.ndim != 2 or b.shape != (W.shape[0],) or X.ndim != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"weight_bias_shares takes W (C_out, C_in), b (C_out,), X (N, C_in); got W "
                         f"{tuple(W.shape)}, b {tuple(b.shape)}, X {tuple(X.shape)}")
    W, b, X = W.double(), b.double(), X.double()
    wx = X @ W.T
    full = wx + b
    full_norm = full.norm(dim=1).median().clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(wx, full, dim=1, eps=1e-12)
    return {"wx_share": float(wx.norm(dim=1).median() / full_norm), "bias_share": float(b.norm() / full_norm),
            "cos_wx_full": float(cos.median())}


def spectrum_metrics(W: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Returns erank (Roy and Vetterli), erank_energy, both divided by C too, numerical rank, spectral norm,
    the energy share of the top 1/5/10 singular values, and the distance from an isometry (RMS of s/mean(s)-1)."""
    s = torch.linalg.svdvals(W.double())
    c = min(W.shape)
    energy = s ** 2 / (s ** 2).sum().clamp_min(1e-300)
    tol = s.max() * max(W.shape) * torch.finfo(torch.float64).eps
    scaled = s / s.mean().clamp_min(1e-300)
    out = {"erank": effective_rank(s, "roy"), "erank_energy": effective_rank(s, "energy"),
           "rank": float((s > tol).sum()), "spectral_norm": float(s[0]),
           "top1_energy": float(energy[:1].sum()), "top5_energy": float(energy[:5].sum()),
           "top10_energy": float(energy[:10].sum()), "isometry_rms": float(((scaled - 1) ** 2).mean().sqrt())}
    out["erank_frac"] = out["erank"] / c
    out["erank_energy_frac"] = out["erank_energy"] / c
    return {prefix + k: v for k, v in out.items()}


def truncate(W: torch.Tensor, k: int, around: torch.Tensor | None = None) -> torch.Tensor:
    """Returns W with only its top ``k`` singular directions (of W - around, added back when given)."""
    base = around if around is not None else torch.zeros_like(W)
    u, s, vh = torch.linalg.svd((W - base).double(), full_matrices=False)
    k = max(0, min(int(k), len(s)))
    return (base.double() + (u[:, :k] * s[:k]) @ vh[:k]).to(W.dtype)


def delta_shares(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> dict[str, float]:
    """Returns ``delta_wx_share`` and ``delta_bias_share`` of the predicted change y_hat - x = (W - I) x + b.

    Over feature vectors X (N, C): delta_wx_share = median_n ||(W - I) x_n|| / median_n ||y_hat_n - x_n||,
    delta_bias_share = ||b|| / median_n ||y_hat_n - x_n||. W = I with b != 0 gives (0, 1); b = 0 gives (1, 0).
    Both are NaN when the map predicts no change (median ||y_hat_n - x_n|| is 0). The shares need not sum to
    1: the two parts can cancel (each can exceed 1) or point apart.
    """
    if W.ndim != 2 or W.shape[0] != W.shape[1] or b.shape != (W.shape[0],) or X.ndim != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"delta_shares takes a square W (C, C), b (C,), X (N, C); got W {tuple(W.shape)}, "
                         f"b {tuple(b.shape)}, X {tuple(X.shape)}")
    W, b, X = W.double(), b.double(), X.double()
    wx = X @ (W - torch.eye(len(W), dtype=W.dtype)).T
    denom = float((wx + b).norm(dim=1).median())
    if not denom > 0:
        return {"delta_wx_share": float("nan"), "delta_bias_share": float("nan")}
    return {"delta_wx_share": float(wx.norm(dim=1).median()) / denom, "delta_bias_share": float(b.norm()) / denom}


def linear_geometry(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> dict[str, float]:
    """Returns the weight-vs-bias shares of y = W x + b over feature vectors X (N, C_in), the same split of the
    predicted change y - x (``delta_wx_share``, ``delta_bias_share``; square maps), and the spectrum metrics of W
    and of W - I (prefix ``delta_``)."""
    shares = delta_shares(W, b, X) if W.shape[0] == W.shape[1] else {}
    return {**weight_bias_shares(W, b, X), **shares, **spectrum_metrics(W),
            **spectrum_metrics(W - torch.eye(*W.shape, dtype=W.dtype), prefix="delta_")}
