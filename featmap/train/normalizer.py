"""Per-channel normalisation of feature maps, and a map trained in normalised space applied to raw features."""
from __future__ import annotations

import torch
from torch import nn


class Normalizer(nn.Module):
    """Per-channel standardisation fitted on training originals; applied to inputs and targets."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1).float())
        self.register_buffer("std", std.view(1, -1, 1, 1).float())

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Normalizer":
        """Returns the normaliser of (N, C, H, W) features: mean and unbiased std over (N, H, W), std + 1e-6."""
        flat = x.transpose(0, 1).flatten(1).double()
        return cls(flat.mean(1), flat.std(1) + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class NormalizedMap(nn.Module):
    """A map trained in normalised feature space, applied to raw features: denorm(net(norm(x)))."""

    def __init__(self, net: nn.Module, normalizer: Normalizer):
        super().__init__()
        self.net, self.normalizer = net, normalizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.inverse(self.net(self.normalizer(x)))
