"""Which torch device a run computes on, and its backend settings for a block of work."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """Returns CUDA when asked for or when ``auto`` finds it, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e


@contextmanager
def overridden(settings, **values):
    """Sets the named attributes of ``settings`` (a torch backend's flags: ``torch.backends.cudnn``,
    ``torch.backends.cuda.matmul``) inside the block, and puts the values they had back afterwards."""
    before = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(settings, name, value)
