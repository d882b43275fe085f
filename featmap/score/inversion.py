"""Inverters: a backbone layer's feature map (B, C, H, W) -> RGB images (B, 3, S, S) in [0, 1].

``Inverter`` is the interface every reconstruction goes through; ``DecoderInverter`` is the default (a small
convolutional decoder trained per (backbone, layer) on training photos and their manipulated versions,
cached by content like features); ``CallableInverter`` plugs in any other one (a FeatInv checkpoint, say).

Plugging in a decoder you already have (its output in [-1, 1] at 288 px)::

    net = MyDecoder(); net.load_state_dict(load_checkpoint("featinv_blocks6.pth")); net.eval()
    inverter = CallableInverter(net, layer="blocks.6", image_size=288, value_range=(-1, 1), device="cuda")
    images = inverter.invert(feats)          # (B, 3, 288, 288) float32 in [0, 1], on the CPU

or subclass ``Inverter`` and implement ``reconstruct``.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featmap.core.device import resolve_device
from featmap.core.io import cached, content_key, default_cache_dir
from featmap.core.seeding import derive_seed
from featmap.data.images import to_uint8_images
from featmap.train.loop import AdamW, Cosine, Pairs, Recipe, Stopping, fit
from featmap.train.normalizer import Normalizer

# Values this far outside [0, 1] mean the inverter speaks another range: an error, not something to clamp.
_RANGE_SLACK = 0.02


class Inverter(ABC):
    """Maps ``layer``'s feature maps to RGB images of side ``image_size``.

    ``invert`` takes float (B, C, H, W) maps (any device) and returns float32 (B, 3, image_size, image_size)
    images in [0, 1], channels RGB, on the CPU, whatever device the inverter runs on inside. Subclasses set
    ``layer``, ``image_size`` (and ``channels`` where known, to check inputs) and implement ``reconstruct``.
    """

    layer: str
    image_size: int
    channels: int | None = None

    @abstractmethod
    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Returns (B, 3, image_size, image_size) images in [0, 1] (any device) for float32 (B, C, H, W) maps."""

    def invert(self, feats: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Returns float32 (B, 3, image_size, image_size) images in [0, 1] on the CPU for (B, C, H, W) maps."""
        if not isinstance(feats, torch.Tensor) or feats.ndim != 4 or not feats.is_floating_point():
            got = f"{getattr(feats, 'dtype', type(feats).__name__)} of shape {tuple(getattr(feats, 'shape', ()))}"
            raise ValueError(f"invert takes a float (B, C, H, W) tensor of {self.layer} features, got {got}")
        if self.channels is not None and feats.shape[1] != self.channels:
            raise ValueError(f"this inverter takes {self.channels}-channel maps of {self.layer}, got {feats.shape[1]} "
                             "channels: a map of another layer or backbone?")
        out = []
        with torch.no_grad():
            for i in range(0, len(feats), batch_size):
                out.append(self.reconstruct(feats[i:i + batch_size].float()).float().cpu())
        images = torch.cat(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)
        want = (len(feats), 3, self.image_size, self.image_size)
        if tuple(images.shape) != want:
            raise ValueError(f"{type(self).__name__}.reconstruct returned shape {tuple(images.shape)}, expected {want}")
        if len(images) and (images.min() < -_RANGE_SLACK or images.max() > 1 + _RANGE_SLACK):
            raise ValueError(f"{type(self).__name__}.reconstruct returned values in [{images.min():.3g}, "
                             f"{images.max():.3g}]; it must return [0, 1] (for a decoder with another output range, "
                             "use CallableInverter(..., value_range=(low, high)))")
        return images.clamp_(0, 1)


class CallableInverter(Inverter):
    """Any function or module from (B, C, H, W) maps to (B, 3, S, S) images, as an ``Inverter``.

    ``value_range``: the range the function's output is in ((-1, 1) for a tanh decoder); mapped linearly onto
    [0, 1]. ``device``: where the features are sent before the call.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], layer: str, image_size: int,
                 channels: int | None = None, value_range: tuple[float, float] = (0.0, 1.0), device: str = "cpu"):
        low, high = value_range
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.fn, self.layer, self.image_size, self.channels = fn, layer, int(image_size), channels
        self.value_range, self.device = (float(low), float(high)), resolve_device(device)

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        low, high = self.value_range
        return (self.fn(feats.to(self.device)) - low) / (high - low)


@dataclass(frozen=True)
class InverterConfig:
    """The default decoder and its training; every field is part of the cache key except ``device``."""

    # Output side in pixels; the decoder doubles the map's side up to it. Measured on the default photos at
    # lite0 blocks.6 (7x7): 56 px scored the same validation SSIM as 112 px (0.32, compared at 112) for a
    # fifth of the training time, and width 256 no better than 128: a 7x7 map holds the layout, not detail.
    image_size: int = 56
    width: int = 128             # channels after the 1x1 projection; halved by each upsampling block
    min_width: int = 16          # ... but never below this
    epochs: int = 8              # a fixed budget: no early stopping, so a resumed run is the same run
    batch_size: int = 32
    lr: float = 3e-3             # AdamW, cosine-annealed to zero over the epochs
    weight_decay: float = 1e-4
    ssim_weight: float = 1.0     # loss = L1 + ssim_weight * (1 - SSIM), both on [0, 1] pixels
    # ... + feature_weight * (1 - the mean cosine between the layer's features of the reconstruction and of the
    # photo), both through the backbone at its input size (feature matching; where a judge backbone is given)
    feature_weight: float = 0.0
    feature_samples: int = 4     # ... on this many samples of each (shuffled) batch: the backbone pass costs most
    # the training forward pass: float32, bfloat16 (autocast; weights, loss and inference stay float32), or auto:
    # bfloat16 where the device computes it natively (CUDA with bfloat16, a CPU with AVX512-BF16 or AMX), else
    # float32. The resolved one is part of the cache key. Measured on one CPU thread with AVX512-BF16: a training
    # step of the blocks.2 decoder (32 samples) 0.52 -> 0.28 s.
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("image_size", "width", "min_width", "epochs", "batch_size", "lr", "feature_samples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"InverterConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("ssim_weight", "feature_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"InverterConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"InverterConfig.precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")

    def train_dtype(self) -> torch.dtype | None:
        """Returns the autocast dtype of the training forward pass (None: float32), ``auto`` resolved here."""
        if self.precision == "auto":
            return torch.bfloat16 if native_bfloat16(resolve_device(self.device)) else None
        return PRECISIONS[self.precision]

    def identity(self) -> dict:
        """Returns the fields that determine the trained weights: all but ``device``, with the precision resolved
        (an ``auto`` inverter trained in bfloat16 is never read where float32 would run, nor the reverse)."""
        out = {k: v for k, v in asdict(self).items() if k != "device"}
        out["ssim"] = "depthwise convolution"  # the loss's local means (equal to the pooled ones up to rounding)
        out["upsampling"] = "transposed convolution"  # UpsampleConv2d: the same function, other rounding
        dtype = self.train_dtype()
        out["precision"] = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        return out


PRECISIONS = {"auto": None, "float32": None, "bfloat16": torch.bfloat16}


def native_bfloat16(device: torch.device) -> bool:
    """Returns whether ``device`` computes bfloat16 natively: a CUDA device that supports it, or a Linux CPU whose
    flags list avx512_bf16 or amx_bf16 (elsewhere oneDNN emulates bfloat16, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Row p of this matrix says which of a 3x3 kernel's rows (top, middle, bottom) add up in row p of the 4x4 kernel of
# the transposed convolution that equals "nearest-neighbour upsampling x2, then that 3x3 convolution" (padding 1).
_NEAREST_X2 = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class UpsampleConv2d(nn.Conv2d):
    """Nearest-neighbour upsampling x2, then this 3x3 convolution (padding 1), computed as one transposed
    convolution (4x4 kernel, stride 2, padding 1) on the map before upsampling: the same function and the same
    parameters, for 16 / 36 of the multiply-adds (equal to float64 rounding, tested).

    Why it is exact: output pixel 2i + a (a = 0 or 1) sees upsampled pixels 2i + a - 1 ... 2i + a + 1, which are the
    input pixels i - 1, i (a = 0) or i, i + 1 (a = 1); the taps that read the same input pixel add up. Measured on one
    CPU thread, forward and backward of the blocks.2 decoder's 128 -> 64 block (32 maps of 28 x 28) under bfloat16
    autocast: 268 -> 127 ms; in float32 457 -> 223 ms."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tensor(_NEAREST_X2, dtype=self.weight.dtype, device=self.weight.device)
        with torch.autocast(x.device.type, enabled=False):  # the 4x4 kernel's sums in the weights' precision
            kernel = torch.einsum("pa,qb,oiab->iopq", a, a, self.weight)
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


class DecoderNet(nn.Module):
    """Per-channel standardisation, a 1x1 projection, then (upsample x2, 3x3 conv, GroupNorm, ReLU) blocks
    while the side can double without passing ``image_size``; a 3x3 conv to RGB, a bilinear resize to exactly
    ``image_size`` where the doublings fall short, and a sigmoid."""

    def __init__(self, channels: int, side: int, image_size: int, width: int = 128, min_width: int = 16):
        super().__init__()
        self.channels, self.side, self.image_size = channels, side, image_size
        self.normalizer = Normalizer(torch.zeros(channels), torch.ones(channels))
        self.proj = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GroupNorm(8, width), nn.ReLU())
        blocks, w = [], width
        while side * 2 <= image_size:
            w_out = max(min_width, w // 2)
            blocks += [UpsampleConv2d(w, w_out), nn.GroupNorm(8, w_out), nn.ReLU()]
            side, w = side * 2, w_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(w, 3, 3, padding=1)
        # The default (NCHW) layout: with the upsampling as a transposed convolution, channels-last made a training
        # step of the blocks.2 decoder slower under bfloat16 (182 -> 201 ms on one CPU thread; GroupNorm's backward
        # is slow in that layout) and faster by 2% only in float32 (310 -> 303 ms).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x)
        x = self.head(self.blocks(self.proj(x)))  # (B, 3, side * 2^k, ...)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x.float()).contiguous()  # float32 images also from a bfloat16 (autocast) pass


class DecoderInverter(Inverter):
    """The default inverter: a trained ``DecoderNet`` (see ``train_inverter``)."""

    def __init__(self, net: DecoderNet, layer: str, device: str = "cpu", key: str = "", history: dict | None = None):
        self.net, self.layer, self.key = net.eval(), layer, key
        self.image_size, self.channels = net.image_size, net.channels
        self.device = resolve_device(device)
        self.net.to(self.device)
        self.history = history or {}
        self.epochs_run = 0  # epochs trained by the call that returned this inverter (0: loaded from the cache)

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.to(self.device))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "DecoderInverter":
        """Returns the inverter saved at ``path`` by ``train_inverter`` (loaded with weights_only)."""
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
        meta = saved["meta"]
        net = DecoderNet(meta["channels"], meta["side"], meta["config"]["image_size"], meta["config"]["width"],
                         meta["config"]["min_width"])
        net.load_state_dict(saved["net"])
        return cls(net, meta["layer"], device, meta["key"], saved["history"])


class InverterData:
    """(feature map, image) training pairs of one layer, loaded on demand; ``key`` identifies their content.

    ``tensors()`` returns float32 (N, C, H, W) maps and uint8 (N, 3, S, S) images.
    """

    def __init__(self, key: str, load: Callable[[], tuple[torch.Tensor, torch.Tensor]], description: str = ""):
        self.key, self._load, self.description = key, load, description
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            feats, images = self._load()
            if feats.ndim != 4 or images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8 \
                    or len(feats) != len(images) or len(feats) == 0:
                raise ValueError(f"inverter data must be N float (N, C, H, W) maps and N uint8 (N, 3, S, S) images, "
                                 f"N > 0; got {tuple(feats.shape)} and {images.dtype} {tuple(images.shape)}")
            self._tensors = feats.float(), images
        return self._tensors

    @classmethod
    def from_tensors(cls, feats: torch.Tensor, images: np.ndarray | torch.Tensor) -> "InverterData":
        """Returns data from maps and images (uint8 (N, S, S, 3) or float (N, 3, S, S) in [0, 1]), keyed by content."""
        imgs = torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2).contiguous()
        feats = feats.detach().float().cpu().contiguous()
        h = hashlib.sha256()
        for t in (feats, imgs):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        return cls(h.hexdigest(), lambda: (feats, imgs), f"{len(feats)} given pairs")

    @classmethod
    def from_store(cls, store, views: list, manipulations: list, layer: str, image_size: int) -> "InverterData":
        """Returns the pairs (map of view v under m, image of v under m) for every view and for m in
        [original] + ``manipulations``, images resized to ``image_size``; keyed by the store's feature keys."""
        if not views:
            raise ValueError("inverter training needs at least one view; pass the training split's views")
        edits = [None] + [m for m in manipulations if m is not None]
        key = content_key({"maps": [store.key(v, m, layer) for m in edits for v in views], "image_size": image_size})

        def load():
            store.ensure(views, edits)
            feats = torch.cat([store.load(views, m, layer) for m in edits])
            images = np.empty((len(edits), len(views), image_size, image_size, 3), np.uint8)
            for j, v in enumerate(views):
                base = store.image(v, None)  # decode and crop each photo once; edits apply as the store applies them
                edited = [base] + [m(base, store.seed, v.key) for m in edits[1:]]
                images[:, j] = to_uint8_images(np.stack(edited), image_size)
            flat = images.reshape(-1, image_size, image_size, 3)
            return feats, torch.from_numpy(flat).permute(0, 3, 1, 2).contiguous()

        return cls(key, load, f"{len(views)} views x {len(edits)} edits")


def ssim_torch(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Returns per-sample SSIM of (B, C, H, W) images in [0, 1] (uniform ``window`` x ``window`` window, no
    padding: the window scikit-image uses by default; population variances), differentiable: the training loss's
    structural term. Reported numbers use ``metrics.ssim`` (scikit-image).

    The five local means come from one depthwise convolution with a uniform kernel (on one CPU thread, 32 images of
    56 px, forward and backward: 54 -> 15 ms against five average-pooling passes; equal to 1e-7)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n = x.shape[1]
    stacked = torch.cat([x, y, x * x, y * y, x * y], 1)
    kernel = torch.full((5 * n, 1, window, window), 1.0 / window ** 2, dtype=stacked.dtype, device=stacked.device)
    mx, my, xx, yy, xy = F.conv2d(stacked, kernel, groups=5 * n).split(n, 1)
    vx, vy, cxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


class FeatureMatch:
    """A backbone layer's features of [0, 1] images (B, 3, s, s), differentiable with respect to the images: the
    images are resized to the backbone's input size and normalised as it expects, and the forward stops at
    ``layer``. The backbone's weights are frozen."""

    def __init__(self, backbone, layer: str):
        self.backbone, self.layer = backbone, layer
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        pre = backbone.preprocessing
        self.size = pre.size
        self.mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x)) / self.std.to(x)
        return self.backbone.layer_output(x, self.layer)


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns the per-sample mean over positions of the cosine between (B, C, H, W) feature maps."""
    return F.cosine_similarity(a, b, dim=1, eps=1e-8).flatten(1).mean(1)


def inversion_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float,
                   features: FeatureMatch | None = None, feature_weight: float = 0.0,
                   feature_samples: int | None = None) -> torch.Tensor:
    """Returns mean L1 + ssim_weight * (1 - mean SSIM) between (B, 3, H, W) images in [0, 1], plus
    feature_weight * (1 - mean feature cosine) through ``features`` on the first ``feature_samples`` of the batch
    (all for None; the photo's side without gradients)."""
    loss = F.l1_loss(pred, target) + ssim_weight * (1 - ssim_torch(pred, target).mean())
    if features is not None and feature_weight > 0:
        pred, target = pred[:feature_samples], target[:feature_samples]
        with torch.no_grad():
            want = features(target)
        loss = loss + feature_weight * (1 - feature_cosine(features(pred), want).mean())
    return loss


def _unit_images(images: torch.Tensor) -> torch.Tensor:
    """Returns uint8 (B, 3, S, S) images as float32 in [0, 1]: what the decoder's output is compared with."""
    return images.float().div(255)


def inverter_recipe(config: InverterConfig, features: FeatureMatch | None = None) -> Recipe:
    """Returns the inverter's training recipe: L1 + SSIM loss (+ feature matching through ``features`` when given
    and ``config.feature_weight`` > 0), AdamW cosine-annealed to zero over a fixed budget of epochs, no early
    stopping, the last weights; validation (when given) records loss and SSIM, never steers."""
    return Recipe(loss=partial(inversion_loss, ssim_weight=config.ssim_weight, features=features,
                               feature_weight=config.feature_weight, feature_samples=config.feature_samples),
                  optimizer=AdamW(config.lr, config.weight_decay), schedule=Cosine(config.epochs),
                  stopping=Stopping(config.epochs), batch_size=config.batch_size, seed=config.seed,
                  shuffle_stream="inverter-shuffle", dropout_stream=None, metrics={"ssim_torch": ssim_torch},
                  autocast=config.train_dtype())


def inverter_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Returns where the inverter with content key ``key`` is stored: <cache>/inverters/<key>.pt."""
    return Path(cache_dir or default_cache_dir()) / "inverters" / f"{key}.pt"


def fit_decoder(data: InverterData, layer: str, config: InverterConfig = InverterConfig(),
                cache_dir: str | Path | None = None, progress: bool = True,
                val: InverterData | None = None, judge=None) -> DecoderInverter:
    """Returns the decoder inverter trained on ``data`` (loaded from the cache when trained before).

    ``judge``: the backbone whose ``layer`` features the feature-matching term compares (``config.feature_weight``
    > 0); without one the loss is pixels only.

    Content-addressed by (layer, data key, validation data key, config, judge): <cache>/inverters/<key>.pt. An
    interrupted run resumes from <key>.partial.pt, written atomically as ``train.loop.fit`` does; a file that does not
    load is discarded and its work redone. Seeded: the same inputs give the same weights.
    """
    matching = judge is not None and config.feature_weight > 0
    key = content_key({"inverter": "decoder", "layer": layer, "data": data.key,
                       "val": val.key if val is not None else None, "config": config.identity(),
                       "judge": judge.identity() if matching else None})
    final = inverter_path(key, cache_dir)
    partial_file = final.with_name(f"{key}.partial.pt")

    def train() -> DecoderInverter:
        feats, images = data.tensors()
        if images.shape[-1] != config.image_size:
            raise ValueError(f"training images are {images.shape[-1]} px but config.image_size is {config.image_size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "inverter-init", key))
            net = DecoderNet(feats.shape[1], feats.shape[2], config.image_size, config.width, config.min_width)
        fitted = Normalizer.fit(feats)
        net.normalizer.mean.copy_(fitted.mean)
        net.normalizer.std.copy_(fitted.std)
        features = FeatureMatch(judge, layer) if matching else None
        run = fit(net, inverter_recipe(config, features), Pairs(feats, images, _unit_images),
                  Pairs(*val.tensors(), _unit_images) if val is not None else None, resolve_device(config.device),
                  checkpoint=partial_file, progress=progress, desc=f"inverter {layer}")
        history = {"epochs": run.epochs, "seconds": run.seconds, "per_epoch": run.history, "n_pairs": len(feats),
                   "data": data.description}
        inverter = DecoderInverter(run.net.cpu(), layer, config.device, key, history)
        inverter.epochs_run = run.epochs - run.resumed_epoch
        return inverter

    def save(f, inverter: DecoderInverter) -> None:
        meta = {"layer": layer, "key": key, "channels": inverter.channels, "side": inverter.net.side,
                "config": config.identity()}
        torch.save({"net": {k: v.cpu() for k, v in inverter.net.state_dict().items()}, "history": inverter.history,
                    "meta": meta}, f)

    inverter = cached(final, lambda path: DecoderInverter.load(path, config.device), train, save, lock=True)
    partial_file.unlink(missing_ok=True)
    return inverter


def train_inverter(store, views: list, manipulations: list, layer: str, config: InverterConfig = InverterConfig(),
                   cache_dir: str | Path | None = None, progress: bool = True,
                   val_views: list | None = None) -> DecoderInverter:
    """Returns the default inverter of ``layer`` for the store's backbone, trained (or loaded from the cache) on
    ``views`` (training photos only) under no edit and each of ``manipulations``.

    ``val_views``: held-out views whose loss and SSIM are recorded per epoch (they do not steer training).
    ``config.feature_weight`` > 0 matches the store's backbone's ``layer`` features of the reconstructions to the
    photos' (feature matching).
    ``cache_dir``: None is the store's cache root. Nothing is loaded or extracted when the inverter is cached.
    """
    root = cache_dir or store.cache.root
    data = InverterData.from_store(store, views, manipulations, layer, config.image_size)
    val = InverterData.from_store(store, val_views, manipulations, layer, config.image_size) if val_views else None
    return fit_decoder(data, layer, config, root, progress, val, judge=store.backbone)
