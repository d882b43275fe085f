"""Which torch device a run computes on."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """Returns CUDA when asked for or when ``auto`` finds it, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
