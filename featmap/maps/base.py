"""Maps from original to manipulated feature maps, (B, C, H, W) -> (B, C, H, W).

This module holds the interface, the registry and the closed-form maps: ``identity`` (y = x, the floor
every fitted map must beat), ``additive`` (y = x + delta, one delta per channel), ``linear`` (y = W x + b
at every position, shared over positions, fit exactly by ridge toward the identity on streaming
sufficient statistics), ``local_linear`` (a separate W_p, b_p per position, same ridge) and
``procrustes`` (y = R (x - mean_x) + mean_y with R orthogonal). The trained maps live in ``learned.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from featmap.core.registry import Registry
from featmap.maps.stats import LinearStats, PositionStats
from featmap.train.loop import TrainConfig


class FitData(Protocol):
    """What a mapping's ``fit`` may ask of the training data (see ``pipeline.PairData``)."""

    key: str

    def stats(self, part: str) -> LinearStats: ...

    def position_stats(self, part: str) -> PositionStats: ...

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]: ...


# Learned-map sizes: "tiny" for tests and quick looks, "small" keeps the cold book under its CPU budget,
# "reference" is the study's (section 4).
# ``attention_dropout``: dropout on the transformers' attention weights. The reference drops them at 0.2 like
# every other activation; ``small`` does not, so torch's fused attention kernel runs on the CPU. Measured on one
# thread (Lite0 blocks.2, 784 tokens, 48 photos): 52.5 -> 20.4 s per map, mean cosine 0.003 lower on average over
# three edits (0.917/0.905/0.840 -> 0.914/0.901/0.840); at blocks.6 (49 tokens) 8.4 -> 7.6 s, the cosine equal to
# within 0.001 on six edits.
MAP_SIZES = {
    "tiny": {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.0, "attention_dropout": 0.0},
    "small": {"hidden": 128, "layers": 2, "heads": 4, "ffn": 256, "dropout": 0.2, "attention_dropout": 0.0},
    "reference": {"hidden": 512, "layers": 4, "heads": 8, "ffn": 1024, "dropout": 0.2, "attention_dropout": 0.2},
}


# Where the trained non-linear maps start (``featmap.maps.learned``): the closed-form shared linear map plus a
# correction that starts at zero, the identity plus such a correction, or the reference's random initialisation.
START_POINTS = ("linear", "identity", "scratch")


@dataclass(frozen=True)
class MapOptions:
    """Options every mapping may read: ridge strength, learned-map size preset, training settings."""

    ridge: float | str = "auto"
    size: str = "small"
    start: str = "linear"
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        if self.ridge != "auto" and (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float))
                                     or self.ridge < 0 or not math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be 'auto' or a non-negative number, got {self.ridge!r}")
        if self.size not in MAP_SIZES:
            raise ValueError(f"unknown map size {self.size!r}; known: {', '.join(MAP_SIZES)}")
        if self.start not in START_POINTS:
            raise ValueError(f"start must be one of {', '.join(START_POINTS)}, got {self.start!r}")


class Mapping:
    """A map from original to manipulated feature maps; subclasses say whether it is linear, whether it acts
    on each position alone, and whether it is trained by gradient descent."""

    name = "mapping"
    linear = False
    per_position = True
    learned = False

    def __init__(self, options: MapOptions | None = None):
        self.options = options or MapOptions()

    def fit(self, data: FitData) -> "Mapping":
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def n_params(self) -> int:
        return 0

    def fit_seconds(self) -> float | None:
        """Returns the recorded training time where the fit was done elsewhere (a cached map), else None."""
        return None

    def extra_metrics(self) -> dict[str, float]:
        """Returns fit facts worth a results row (e.g. the chosen ridge strength)."""
        return {}


# The global maps the shared linear map is compared with, sample by sample (the study's second claim).
GLOBAL_MAPS = ("transformer", "transformer_pe")
MAPPINGS: Registry[type[Mapping]] = Registry("mapping")  # name -> class; filled by closed_form and learned


def get_mapping(name: str, options: MapOptions | None = None) -> Mapping:
    """Returns a new, unfitted mapping registered under ``name``."""
    return MAPPINGS.get(name)(options)


