"""Batch norm folded into the convolution before it: the same inference map in fewer passes over memory.

A frozen backbone in eval mode computes ``bn(conv(x))`` with fixed statistics, so the pair is one convolution
with scaled weights and a bias. On one CPU thread batch norm was 15% of Lite0's forward pass (measured: 32 images,
508 -> 442 ms with every pair folded). The outputs change in their last bits only; the features' cache key says
how many pairs were folded (``Backbone.identity``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from featmap.core.device import overridden

try:  # timm's norm + activation module (its drop and act run after the normalisation)
    from timm.layers import BatchNormAct2d
    _FOLDABLE: tuple[type, ...] = (nn.BatchNorm2d, BatchNormAct2d)
except ImportError:  # pragma: no cover
    _FOLDABLE = (nn.BatchNorm2d,)


class _ActOnly(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation moved into the convolution."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """Returns (conv name, bn name) for every BatchNorm2d call whose input is the output of the Conv2d called just
    before it, seen on one forward pass of ``probe``."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, int, int]] = []

    def hook(module, args, out):
        calls.append((module, id(args[0]) if args else -1, id(out)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    pairs, seen = [], set()
    for (prev, _, prev_out), (mod, mod_in, _) in zip(calls, calls[1:]):
        if (isinstance(prev, nn.Conv2d) and type(mod) in _FOLDABLE and mod_in == prev_out
                and getattr(mod, "running_var", None) is not None and prev not in seen and mod not in seen
                and prev.out_channels == mod.num_features):
            pairs.append((names[prev], names[mod]))
            seen.update((prev, mod))
    return pairs


def _replacement(bn: nn.Module) -> nn.Module:
    return nn.Identity() if type(bn) is nn.BatchNorm2d else _ActOnly(bn)


def fold_batchnorm(model: nn.Module, probe: torch.Tensor, rtol: float = 1e-4) -> int:
    """Folds, in place, every eval-mode batch norm that directly follows a convolution into it; returns how many.

    Pairs are found on one forward pass of ``probe`` (a conv whose output the next call, a batch norm, takes as
    input). The folded model is then checked against the original on ``probe``: if any output differs by more than
    ``rtol`` of the largest (a conv output that also fed something else, say), nothing is folded and 0 is
    returned. A model in training mode is left alone (its batch norms use batch statistics).
    """
    if model.training or not any(type(m) in _FOLDABLE for m in model.modules()):
        return 0  # training: batch statistics; no batch norm (a ViT): no probe pass needed
    pairs = _pairs(model, probe)
    if not pairs:
        return 0
    original = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(
                bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
            if conv.bias is None:
                conv.bias = nn.Parameter(shift.clone())
            else:
                conv.bias.copy_(conv.bias * scale + shift)
            parent, _, attr = bn_name.rpartition(".")
            setattr(modules[parent] if parent else model, attr, _replacement(bn))
        # compared in full float32: on a GPU, cuDNN's and cuBLAS's TF32 default rounds each product to 10 bits, a
        # difference the fold does not make (measured on an H200: every Lite0 pair refused under TF32)
        with overridden(torch.backends.cudnn, allow_tf32=False), overridden(torch.backends.cuda.matmul,
                                                                            allow_tf32=False):
            want, got = original(probe), model(probe)
    want, got = (torch.cat([t.flatten() for t in v]) if isinstance(v, (tuple, list)) else v for v in (want, got))
    if not torch.allclose(got, want, rtol=0, atol=rtol * float(want.abs().max()) + 1e-6):
        _restore(model, original)
        return 0
    return len(pairs)


def _restore(model: nn.Module, original: nn.Module) -> None:
    """Puts ``original``'s modules and parameters back into ``model`` (in place: references to it stay valid)."""
    for name, child in original.named_children():
        setattr(model, name, child)
