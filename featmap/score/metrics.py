"""Metrics between predicted and true feature maps (B, C, H, W), and between images (uint8 (B, H, W, 3));
each docstring is the definition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from featmap.core.registry import Registry
from featmap.train.loop import channel_cosine


def _check_pair(pred: torch.Tensor, true: torch.Tensor) -> None:
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(f"metrics take two (B, C, H, W) maps of equal shape, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")


def position_cosines(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Returns (B, H*W): cosine between predicted and true channel vectors at each position, in float64:
    p.t / max(|p| |t|, 1e-8) (``channel_cosine``; 0 where a vector is zero)."""
    _check_pair(pred, true)
    return channel_cosine(pred.double(), true.double()).flatten(1)


def cos_mean(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per sample: mean over positions of the cosine between predicted and true channel vectors."""
    return position_cosines(pred, true).mean(1)


def cos_median(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per sample: median over positions (mean of the two middle values for an even count) of the cosine."""
    return position_cosines(pred, true).quantile(0.5, dim=1)


def rel_err(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per sample: ||pred - true||_F / ||true||_F over the whole (C, H, W) map."""
    _check_pair(pred, true)
    diff = (pred.double() - true.double()).flatten(1).norm(dim=1)
    return diff / true.double().flatten(1).norm(dim=1).clamp_min(1e-12)


@dataclass(frozen=True)
class Metric:
    """A per-sample metric and its direction."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool


METRICS: Registry = Registry("metric")  # feature and image metrics
METRICS.add("cos_mean", lambda: Metric("cos_mean", cos_mean, True))
METRICS.add("cos_median", lambda: Metric("cos_median", cos_median, True))
METRICS.add("rel_err", lambda: Metric("rel_err", rel_err, False))
FEATURE_METRICS = ["cos_mean", "cos_median", "rel_err"]


@dataclass(frozen=True)
class TableMetric:
    """A metric computed elsewhere (the classifier tail's) registered for its direction and definition."""

    name: str
    higher_is_better: bool
    definition: str


for _name, _higher, _definition in (
        ("top1_agree", True, "1 when the predicted map's top-1 class is the true manipulated map's (see top1_agree)"),
        ("jsd", False, "Jensen-Shannon divergence in bits between the two class distributions (see jsd)"),
        ("top1_acc", True, "1 when the ImageNet label is the top-1 class of the map (see topk_correct)"),
        ("top5_acc", True, "1 when the ImageNet label is among the top-5 classes of the map (see topk_correct)"),
        ("cos_changed_mean", True, "cos_mean over the positions the edit changed only (see score.change)"),
        ("cos_changed_median", True, "cos_median over the positions the edit changed only (see score.change)")):
    METRICS.add(_name, lambda n=_name, h=_higher, d=_definition: TableMetric(n, h, d))

# Row-name suffixes that keep the direction of the metric they qualify.
_SUFFIXES = ("_vs_inv_target",)


def higher_is_better(metric: str) -> bool:
    """Returns whether a larger value of the results-table metric ``metric`` is better, from the registry: a
    registered metric, the same with ``_vs_inv_target`` or scored on validation photos (``val_``), or a paired
    gap ``<metric>_gap_<map>`` (a map minus another on ``<metric>``: larger is better exactly when it is for
    ``<metric>``). Raises for other names."""
    base = metric.split("_gap_")[0].removeprefix("val_")
    for suffix in _SUFFIXES:
        base = base.removesuffix(suffix)
    import featmap.score  # noqa: F401  (image metrics register on import)

    return METRICS.get(base).higher_is_better


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Returns softmax probabilities (float64) of (B, classes) logits."""
    return torch.softmax(logits.double(), dim=1)


def top1_agree(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 when the argmax class of ``p`` equals that of ``q``, else 0."""
    return (p.argmax(1) == q.argmax(1)).double()


def jsd(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per sample: Jensen-Shannon divergence in bits (base 2) between class distributions; eps avoids log 0.

    0 for identical distributions, 1 for distributions with disjoint support.
    """
    p, q = p.double().clamp_min(0), q.double().clamp_min(0)
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    m = (p + q) / 2

    def kl(a, b):
        return (a * (torch.log2(a + eps) - torch.log2(b + eps))).sum(1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


def topk_correct(p: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: 1 when ``labels`` is among the ``k`` most probable classes of ``p``, else 0."""
    return (p.topk(k, dim=1).indices == labels.view(-1, 1)).any(1).double()


