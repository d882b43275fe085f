"""Seeds derived from (seed, item, ...): every random draw in featmap comes from one of these."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """Returns a 63-bit integer that depends only on ``seed`` and the string forms of ``parts``."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(str(p) for p in parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """Returns a NumPy generator seeded from (seed, parts), independent of call order."""
    return np.random.default_rng(derive_seed(seed, *parts))


def torch_generator_for(seed: int, *parts: object) -> torch.Generator:
    """Returns a CPU torch generator seeded from (seed, parts)."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
