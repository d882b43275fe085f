"""Bootstrap intervals over per-sample values, seeded."""
from __future__ import annotations

import numpy as np

from featmap.core.seeding import rng_for


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 key: str = "") -> tuple[float, float]:
    """Returns the percentile bootstrap interval of the mean of ``values`` (resampling samples, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array of per-sample values, got shape {values.shape}")
    if len(values) == 1 or n_boot <= 0:
        return float("nan"), float("nan")
    idx = rng_for(seed, "bootstrap", key).integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
