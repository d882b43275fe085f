"""Reliability: hostile images, wrong parameters, processes killed mid-run, reproducibility, no pickles run,
no network. Each group counts its cases (``*_CASES``, ``KILLS``) so the closing note can report them.

What the unit tests in test_images.py, test_cache.py and test_config.py already check is not repeated here.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from featmap.core.device import resolve_device
from featmap.core.registry import UnknownNameError
from featmap.core.table import TIMING_METRICS as TIMED
from featmap.data.images import ImageLoadError, ImageSet, load_rgb, square_view
from featmap.edits.manipulations import get_manipulation
from featmap.features.backbone import create_model
from featmap.features.store import FeatureCache, FeatureStore
from featmap.maps.base import MAPPINGS, MapOptions, get_mapping
from featmap.run.chapter import run_chapter
from featmap.run.config import RunConfig
from featmap.score.geometry import effective_rank
from featmap.score.metrics import METRICS
from featmap.train.loop import TrainConfig

PACKAGE = Path(__file__).resolve().parent.parent / "featmap"


# -- hostile and unusual image files ---------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data behind it."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def _photo(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth random colour image (compresses like a photo, unlike white noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def _corrupt_png(path: Path) -> Path:
    data = bytearray(io.BytesIO(_encode(_photo(1), "PNG")).getvalue())
    idat = data.index(b"IDAT")
    for i in range(idat + 8, idat + 200, 7):  # flip bytes inside the compressed pixels, keep the header
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    return path


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated(path: Path) -> Path:
    img = Image.fromarray(_photo(2, 30, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    img.save(path, exif=exif.tobytes())
    return path


def _animated_gif(path: Path) -> Path:
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _rgb16(path: Path) -> Path:
    import cv2

    arr = (_photo(3).astype(np.uint16) * 257)  # 16-bit RGB whose high bytes are _photo(3)
    cv2.imwrite(str(path), arr[..., ::-1])  # OpenCV writes BGR
    return path


def _palette_with_transparency(path: Path) -> Path:
    img = Image.fromarray(_photo(4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0  # palette entry 0 is transparent
    img.save(path, transparency=0)
    return path


# name -> (writer(folder) -> path, readable, check of the decoded (H, W, 3) uint8 array or None)
IMAGE_KINDS = {
    "grayscale_png": (lambda d: _save(d / "grey.png", Image.fromarray(_photo(5)).convert("L")), True,
                      lambda a: (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()),
    "grayscale_jpeg": (lambda d: _save(d / "grey.jpg", Image.fromarray(_photo(6)).convert("L")), True,
                       lambda a: (a[..., 0] == a[..., 2]).all()),
    "palette_gif": (lambda d: _save(d / "pal.gif", Image.fromarray(_photo(7)).convert("P")), True, None),
    "palette_transparent_png": (lambda d: _palette_with_transparency(d / "paltrans.png"), True, None),
    "alpha_png": (lambda d: _save(d / "alpha.png", Image.fromarray(np.dstack([_photo(8), np.zeros((48, 64), np.uint8)]),
                                                                   "RGBA")),
                  True, lambda a: (a == 255).all()),  # fully transparent: the white background
    "gray_alpha_png": (lambda d: _save(d / "la.png", Image.fromarray(_photo(9)).convert("LA")), True, None),
    "sixteen_bit_gray_png": (lambda d: _save(d / "g16.png", Image.fromarray(
        (np.arange(48 * 64, dtype=np.uint16) * 21).reshape(48, 64))), True, lambda a: a.max() >= 250),
    "sixteen_bit_rgb_png": (lambda d: _rgb16(d / "rgb16.png"), True, lambda a: np.array_equal(a, _photo(3))),
    "cmyk_jpeg": (lambda d: _save(d / "cmyk.jpg", Image.fromarray(_photo(10)).convert("CMYK")), True, None),
    "exif_rotated_jpeg": (lambda d: _exif_rotated(d / "exif.jpg"), True, lambda a: a.shape[:2] == (60, 30)),
    "animated_gif": (lambda d: _animated_gif(d / "anim.gif"), True, lambda a: (a < 50).all()),  # the first frame
    "one_pixel_png": (lambda d: _save(d / "one.png", Image.new("RGB", (1, 1), (9, 99, 199))), True,
                      lambda a: a.tolist() == [[[9, 99, 199]]]),
    "long_strip_png": (lambda d: _save(d / "strip.png", Image.fromarray(_photo(11, 8, 4000))), True, None),
    "webp": (lambda d: _save(d / "x.webp", Image.fromarray(_photo(12)), lossless=True), True,
             lambda a: np.array_equal(a, _photo(12))),
    "zero_byte": (lambda d: _write(d / "zero.jpg", b""), False, None),
    "text_named_jpeg": (lambda d: _write(d / "notes.jpg", "hello"), False, None),
    "truncated_jpeg": (lambda d: _write(d / "trunc.jpg", _encode(_photo(13, 256, 256), "JPEG")[:1500]), False, None),
    "truncated_png": (lambda d: _write(d / "trunc.png", _encode(_photo(14, 256, 256), "PNG")[:900]), False, None),
    "corrupt_png": (lambda d: _corrupt_png(d / "corrupt.png"), False, None),
    "garbage_after_jpeg_magic": (lambda d: _write(d / "garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
                                 False, None),
    "huge_dimension_png": (lambda d: _write(d / "bomb.png", _png_header_only(100_000, 100_000)), False, None),
    "huge_dimension_warning_png": (lambda d: _write(d / "big.png", _png_header_only(10_000, 10_000)), False, None),
    "zero_width_png": (lambda d: _write(d / "zerowidth.png", _png_header_only(0, 10)),
                       False, None),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_each_image_kind_decodes_to_rgb_or_fails_naming_the_file(tmp_path, kind):
    writer, readable, check = IMAGE_KINDS[kind]
    path = writer(tmp_path)
    if not readable:
        with pytest.raises(ImageLoadError, match=re.escape(path.name)):
            load_rgb(path)
        return
    arr = load_rgb(path)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous
    assert check is None or check(arr), f"{kind}: decoded pixels are wrong"
    for crop in (None, (1, 35, True)):  # the evaluation crop and a seeded random crop
        view = square_view(arr, 32, "bicubic", 0.875, random_crop=crop)
        assert view.shape == (32, 32, 3) and view.dtype == np.uint8


def test_a_folder_of_every_kind_extracts_the_readable_and_names_the_rest(tmp_path, lite0):
    folder = tmp_path / "kinds"
    folder.mkdir()
    paths = {kind: writer(folder) for kind, (writer, _, _) in IMAGE_KINDS.items()}
    with pytest.raises(ImageLoadError, match="skip_bad_images"):
        ImageSet.from_folder(folder)
    images = ImageSet.from_folder(folder, skip_bad=True)
    readable = {k for k, (_, ok, _) in IMAGE_KINDS.items() if ok}
    assert {p.path.name for p in images.photos} == {paths[k].name for k in readable}
    assert sorted(s.split(":")[0] for s in images.skipped) == sorted(paths[k].name for k in IMAGE_KINDS
                                                                     if k not in readable)
    from featmap.data.images import View

    views = [View(p) for p in images.photos]
    store = FeatureStore(lite0, FeatureCache(tmp_path / "cache"), progress=False, batch_size=8)
    assert store.ensure(views, [None, get_manipulation("rotation_90")]) == 2 * len(views)
    maps = store.load(views, None, "blocks.6")
    assert maps.shape == (len(views), 320, 7, 7) and torch.isfinite(maps).all()


def test_a_long_strip_is_viewed_without_a_giant_intermediate(tmp_path):
    # Resizing a 1 x 4000 strip so its short side reaches 256 px before cropping needs about 790 MB; the view
    # must stay near the size of the strip. Measured in a fresh process: peak RSS is per process.
    path = _save(tmp_path / "strip.png", Image.fromarray(_photo(11, 8, 4000)[:1]))
    code = ("import resource, sys; from featmap.data.images import load_rgb, square_view;"
            "a = load_rgb(sys.argv[1]); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "v = square_view(a, 224, 'bicubic', 0.875); assert v.shape == (224, 224, 3);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    grown_kib = int(subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True,
                                   text=True).stdout)
    assert grown_kib < 64 * 1024, f"viewing a 1 x 4000 strip grew the process by {grown_kib} KiB"


# -- wrong parameter types and unknown names, everywhere a user names something ------------------------

def _config(**kw):
    return RunConfig(**{"chapter": "geometric", "manipulations": ["rotation_90"], **kw})


# (what the user did, call, error type, a pattern the message must match: it names the bad input)
WRONG_PARAMETER_CASES = [
    ("manipulations as one string", lambda: _config(manipulations="rotation_90"), TypeError,
     r"manipulations must be a non-empty list.*'rotation_90'"),
    ("a number as a manipulation", lambda: _config(manipulations=[90]), TypeError, r"manipulations.*\[90\]"),
    ("rotation by 45 degrees", lambda: _config(manipulations=["rotation_45"]), ValueError,
     r"'rotation_45' in the manipulations .*multiple of 90.*45; use rotation_90, rotation_180 or rotation_270"),
    ("rotation by 45 degrees for the inverter", lambda: _config(inverter_manipulations=["rotation_45"]), ValueError,
     r"'rotation_45' in the .*inverter_manipulations\) parameter.*use rotation_90"),
    ("zero noise", lambda: _config(manipulations=["noise_0"]), ValueError,
     r"'noise_0' in the manipulations .*sigma must be positive, got 0.*e\.g\. noise_40"),
    ("mask box upside down", lambda: _config(manipulations=["mask_0.6_0.1_0.2_0.5_ff00ff"]), ValueError,
     r"in the manipulations .*0 <= x0 < x1 <= 1.*0\.6.*e\.g\. mask_0\.1_0\.1_0\.6_0\.6_ff00ff"),
    ("mask colour not hex", lambda: _config(manipulations=["mask_0_0_0.5_0.5_zzzzzz"]), UnknownNameError,
     r"unknown manipulation.* 'mask_0_0_0.5_0.5_zzzzzz'.*mask_<x0>"),
    ("hue shift not a number", lambda: _config(manipulations=["hue_shift_red"]), UnknownNameError,
     r"'hue_shift_red'.*hue_shift_<PIL hue units>"),
    ("empty mappings", lambda: _config(mappings=[]), TypeError, r"mappings must be a non-empty list.*\[\]"),
    ("unknown mapping", lambda: _config(mappings=["ridge"]), UnknownNameError, r"unknown mapping 'ridge'; known:"),
    ("spatial as one string", lambda: _config(spatial="applied"), TypeError, r"spatial must be.*'applied'"),
    ("backbone not a string", lambda: _config(backbone=50), TypeError, r"backbone must be a non-empty string, got 50"),
    ("weights None", lambda: _config(weights=None), TypeError, r"weights must be a non-empty string, got None"),
    ("device not a string", lambda: _config(device=0), TypeError, r"device must be a non-empty string, got 0"),
    ("unknown start", lambda: _config(start="zero"), ValueError,
     r"start must be one of linear, identity, scratch, got 'zero'"),
    ("unknown map size", lambda: _config(map_size="huge"), ValueError, r"unknown map_size 'huge'; known: .*small"),
    ("learned layer not in layers", lambda: _config(learned_layers=["blocks.9"]), ValueError,
     r"learned_layers \['blocks.9'\] are not in layers"),
    ("semantic layers as a word", lambda: _config(semantic_layers="middle"), TypeError,
     r"semantic_layers must be a non-empty list.*'middle'"),
    ("max_epochs as a string", lambda: _config(max_epochs="10"), TypeError,
     r"max_epochs must be an integer or None, got '10'"),
    ("max_steps negative", lambda: _config(max_steps=-5), ValueError, r"max_steps must be in \[0, .*got -5"),
    ("patience under eval_every", lambda: _config(patience=5, eval_every=10), ValueError,
     r"patience must be in \[10, .*got 5"),
    ("eval_every zero", lambda: _config(eval_every=0), ValueError, r"eval_every must be in \[1, .*got 0"),
    ("plateau_steps as a float", lambda: _config(plateau_steps=2.5), TypeError,
     r"plateau_steps must be an integer, got 2.5"),
    ("max_epochs zero", lambda: _config(max_epochs=0), ValueError, r"max_epochs must be in \[1, .*got 0"),
    ("lr as a word", lambda: _config(lr="fast"), TypeError, r"lr must be a number, got 'fast'"),
    ("lr zero", lambda: _config(lr=0), ValueError, r"lr must be in .*got 0"),
    ("train_batch of one", lambda: _config(train_batch=1), ValueError, r"train_batch must be in \[2, .*got 1"),
    ("val_fraction zero", lambda: _config(val_fraction=0.0), ValueError, r"val_fraction must be in .*got 0"),
    ("image_size as a string", lambda: _config(image_size="224"), TypeError, r"image_size must be an integer.*'224'"),
    ("image_size too small", lambda: _config(image_size=8), ValueError, r"image_size must be in \[16, .*got 8"),
    ("batch_size zero", lambda: _config(batch_size=0), ValueError, r"batch_size must be in \[1, .*got 0"),
    ("bootstrap negative", lambda: _config(bootstrap=-1), ValueError, r"bootstrap must be in \[0, .*got -1"),
    ("max_images a float", lambda: _config(max_images=10.5), TypeError, r"max_images must be an integer.*10.5"),
    ("cache_dir a number", lambda: _config(cache_dir=3), TypeError, r"cache_dir must be a path string or None, got 3"),
    ("unknown backbone", lambda: create_model("resnet_50_typo"), ValueError,
     r"unknown backbone 'resnet_50_typo': not a timm model name"),
    ("backbone close to a real name", lambda: create_model("resnet5"), ValueError, r"'resnet5'.*similar: .*resnet50"),
    ("weights path that does not exist", lambda: create_model("resnet18", "/nowhere/w.pth"), FileNotFoundError,
     r"checkpoint /nowhere/w.pth does not exist"),
    ("weights of another model", lambda: create_model("resnet18", _LITE0_WHEEL), ValueError,
     r"does not fit resnet18: \d+ missing keys"),
    ("device gpu", lambda: resolve_device("gpu"), ValueError, r"device must be .*got 'gpu'"),
    ("unknown layer", lambda: _backbone(["blocks.60"]), ValueError,
     r"blocks.60.* tf_efficientnet_lite0"),
    ("layers as one string", lambda: _backbone("blocks.6"), TypeError, r"layers must be a non-empty list.*'blocks.6'"),
    ("images folder missing", lambda: ImageSet.from_spec("/nowhere/photos"), FileNotFoundError,
     r"image folder /nowhere/photos does not exist"),
    ("images not a string", lambda: ImageSet.from_spec(7), TypeError, r"images must be .*got 7"),
    ("interpolation unknown", lambda: square_view(np.zeros((4, 4, 3), np.uint8), 2, "cubic"), ValueError,
     r"interpolation must be one of .*got 'cubic'"),
    ("manipulation name not a string", lambda: get_manipulation(90), TypeError,
     r"manipulation name must be a string, got int 90"),
    ("manipulation of a float image", lambda: get_manipulation("grayscale")(np.zeros((4, 4, 3))), TypeError,
     r"uint8 RGB array, got"),
    ("unknown metric", lambda: METRICS.get("cosine"), UnknownNameError,
     r"unknown metric 'cosine'; known: cos_changed_mean"),
    ("mapping with a ridge word", lambda: get_mapping("linear", MapOptions(ridge="strong")), ValueError,
     r"ridge must be 'auto' or a non-negative number, got 'strong'"),
    ("mapping with an unknown size", lambda: MapOptions(size="xl"), ValueError, r"unknown map size 'xl'"),
    ("unknown mapping in the registry", lambda: MAPPINGS.get("Linear"), UnknownNameError,
     r"unknown mapping 'Linear'; known: .*linear"),
    ("training lr zero", lambda: TrainConfig(lr=0), ValueError,
     r"training lr must be a number in \[1e-08, 1.0\], got 0"),
    ("training patience under eval_every", lambda: TrainConfig(patience=5, eval_every=10), ValueError,
     r"training patience \(5\) and plateau_steps .* must be at least eval_every \(10\)"),
    ("effective rank convention", lambda: effective_rank(torch.ones(3), "shannon"), ValueError,
     r"convention must be 'roy' or 'energy', got 'shannon'"),
]


def _backbone(layers):
    from featmap.features.backbone import Backbone

    return Backbone("tf_efficientnet_lite0", layers, weights="random")


def _lite0_wheel() -> str:
    from featmap.features.backbone import _wheel_checkpoint

    return str(_wheel_checkpoint("tf_efficientnet_lite0"))


_LITE0_WHEEL = _lite0_wheel()


@pytest.mark.parametrize("what,call,error,pattern", WRONG_PARAMETER_CASES, ids=[c[0] for c in WRONG_PARAMETER_CASES])
def test_a_wrong_parameter_fails_naming_itself(what, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_wrong_parameters_through_papermill_stop_at_the_first_cell(tmp_path, photo_dir):
    import papermill as pm

    book = PACKAGE.parent / "book"
    with pytest.raises(pm.PapermillExecutionError, match="unknown manipulation.* 'rotate_90'"):
        pm.execute_notebook(str(book / "geometric.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                            parameters={"images": str(photo_dir), "manipulations": ["rotate_90"]}, progress_bar=False)


# -- processes killed mid-run, then rerun --------------------------------------------------------------

def _run_child(plan: dict, run_dir: str) -> None:
    """Runs one chapter in a forked child. With a kill plan, SIGKILLs itself at the k-th atomic write of one
    kind of file: before it, half way through the temporary file, after the rename, or after tearing the final
    file (what a filesystem without atomic rename, or a disk error, would leave). Writes its write counts."""
    import traceback

    import featmap.core.io
    import featmap.maps.learned
    import featmap.train.loop

    os.environ["FEATMAP_RESULTS"] = str(Path(run_dir) / "results")
    featmap.train.loop.CHECKPOINT_SECONDS = 0.0  # a checkpoint after every epoch: the kills can land on them
    real, counts, kill = featmap.core.io.atomic_write, {}, plan["kill"]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hooked(path, write):
        name = Path(path).name
        kind = ("feature" if name.endswith(".npy") else "checkpoint" if name.endswith(".partial.pt")
                else "map" if name.endswith(".pt") and Path(path).parent.name == "maps" else "other")
        counts[kind] = counts.get(kind, 0) + 1
        if not kill or kill["kind"] != kind or kill["at"] != counts[kind]:
            return real(path, write)
        if kill["how"] == "before":
            die()
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
        if kill["how"] == "torn":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data[:len(data) // 2])
            die()

        def half(f):
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        real(path, half if kill["how"] == "mid" else lambda f: f.write(data))
        die()  # "after": the file is complete and renamed

    for name, module in list(sys.modules.items()):  # every module that writes through the atomic helper
        if name.startswith("featmap.") and getattr(module, "atomic_write", None) is real:
            module.atomic_write = hooked
    try:
        run_chapter(RunConfig(**plan["config"]))
    except BaseException:
        (Path(run_dir) / "error.txt").write_text(traceback.format_exc())
        raise
    (Path(run_dir) / "counts.json").write_text(json.dumps(counts))


# Children fork from a server that has imported featmap (and torch) but run nothing: each starts in
# milliseconds instead of paying the imports again, and no OpenMP thread pool exists at the fork.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["featmap.run.chapter", "featmap.maps.learned"])

TIMING_METRICS = list(TIMED)  # wall-clock rows: the only rows allowed to differ between runs


def _child_config(photo_dir: Path, cache: Path) -> dict:
    return {"chapter": "geometric", "manipulations": ["rotation_90", "grayscale"], "layers": ["blocks.6"],
            "images": str(photo_dir), "image_size": 128, "mappings": ["identity", "linear", "mlp"],
            "max_steps": 10, "eval_every": 2, "patience": 10, "plateau_steps": 4, "bootstrap": 50, "threads": 1,
            "batch_size": 2, "cache_dir": str(cache)}


def _start(photo_dir: Path, run_dir: Path, kill: dict | None = None):
    """Starts one child run; its cache is ``run_dir``'s parent's ``cache``, shared by successive runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    plan = {"config": _child_config(photo_dir, run_dir.parent / "cache"), "kill": kill}
    proc = _FORKS.Process(target=_run_child, args=(plan, str(run_dir)), daemon=True)
    proc.start()
    proc.run_dir = run_dir
    return proc


def _finish(proc) -> tuple[int, str]:
    """Waits for a child; returns its exit code (-9: killed) and its traceback, if it failed."""
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError("a child run hung for 5 minutes")
    errors = [p.read_text() for p in proc.run_dir.glob("error.txt")]
    return proc.exitcode, "".join(errors)


def _without_timing(csv: Path) -> bytes:
    table = pd.read_csv(csv)
    return table[~table.metric.isin(TIMING_METRICS)].to_csv(index=False).encode()


def _cached_arrays(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.rglob("*.npy"))}


def _map_weights(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True)["model"]
            for p in sorted((cache / "maps").glob("*.pt")) if not p.name.endswith(".partial.pt")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, photo_dir):
    """An uninterrupted run of the child config in a fresh cache: its folder and write counts."""
    root = tmp_path_factory.mktemp("reference")
    code, err = _finish(_start(photo_dir, root / "run"))
    assert code == 0, err[-3000:]
    return root, json.loads((root / "run" / "counts.json").read_text())


# Kill points: (kind of write, how), in the order a run meets them. Their positions (the k-th such write in
# that process) are drawn from a seeded generator.
KILLS = [("feature", "before"), ("feature", "mid"), ("feature", "torn"), ("feature", "after"),
         ("checkpoint", "before"), ("checkpoint", "mid"), ("checkpoint", "after"), ("map", "mid"), ("map", "torn")]
TIMED_KILLS = 3  # and kills at seeded random moments in time, wherever the process is then


def _assert_same_as_reference(run_root: Path, ref_root: Path) -> None:
    assert _without_timing(run_root / "run" / "results" / "geometric.csv") == \
        _without_timing(ref_root / "run" / "results" / "geometric.csv")
    assert _cached_arrays(run_root / "cache") == _cached_arrays(ref_root / "cache")  # torn entries were redone
    ours, theirs = _map_weights(run_root / "cache"), _map_weights(ref_root / "cache")
    assert ours.keys() == theirs.keys() and len(ours) == 2  # mlp after the grid operation, and on grayscale
    for name in ours:
        for k in theirs[name]:
            assert torch.equal(ours[name][k], theirs[name][k]), f"map {name} {k} differs after resuming"


def test_killed_at_seeded_writes_then_rerun_gives_the_uninterrupted_results(tmp_path, photo_dir, reference_run):
    ref_root, ref_counts = reference_run
    assert ref_counts["feature"] >= 20 and ref_counts["map"] == 2 and ref_counts["checkpoint"] >= 3  # it counted
    rng = np.random.default_rng(2026)
    for kind, how in KILLS:
        # A run extracts or trains only what is missing, so the k-th write of this run is a new one.
        at = int(rng.integers(1, 3 if kind == "map" else 6))
        code, err = _finish(_start(photo_dir, tmp_path / "run", {"kind": kind, "at": at, "how": how}))
        assert code == -signal.SIGKILL, f"the kill at {kind} write {at} ({how}) did not happen: {err[-2000:]}"
    code, err = _finish(_start(photo_dir, tmp_path / "run"))
    assert code == 0, err[-3000:]
    _assert_same_as_reference(tmp_path, ref_root)


def _files_written(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*") if p.suffix in (".npy", ".pt")) if cache.exists() else 0


def test_killed_at_seeded_moments_then_rerun_gives_the_uninterrupted_results(tmp_path, photo_dir, reference_run):
    # Each kill comes a seeded pause after the run wrote its first new file (so it lands mid-work whatever the
    # machine's speed): during extraction, training or scoring, wherever the process is then.
    died = []
    for pause in np.random.default_rng(7).uniform(0.0, 0.4, TIMED_KILLS):
        before = _files_written(tmp_path / "cache")
        proc = _start(photo_dir, tmp_path / "run")
        while proc.is_alive() and _files_written(tmp_path / "cache") == before:
            time.sleep(0.002)
        time.sleep(pause)
        proc.kill()
        died.append(_finish(proc)[0] == -signal.SIGKILL)
    assert died[0], "the first kill came after the run had finished: it tested nothing"
    code, err = _finish(_start(photo_dir, tmp_path / "run"))
    assert code == 0, err[-3000:]
    _assert_same_as_reference(tmp_path, reference_run[0])


def test_a_torn_training_checkpoint_is_discarded(tmp_path, photo_dir, reference_run):
    code, err = _finish(_start(photo_dir, tmp_path / "run", {"kind": "checkpoint", "at": 2, "how": "torn"}))
    assert code == -signal.SIGKILL, err[-2000:]
    code, err = _finish(_start(photo_dir, tmp_path / "run"))
    assert code == 0, err[-3000:]
    assert _without_timing(tmp_path / "run" / "results" / "geometric.csv") == \
        _without_timing(reference_run[0] / "run" / "results" / "geometric.csv")


# -- the same config twice: the same bytes --------------------------------------------------------------

@pytest.fixture(scope="module")
def second_run(tmp_path_factory, photo_dir, reference_run):
    """The reference config run again in its own fresh cache: everything recomputed."""
    root = tmp_path_factory.mktemp("second")
    code, err = _finish(_start(photo_dir, root / "run"))
    assert code == 0, err[-3000:]
    return root


def test_the_same_config_twice_gives_identical_results_but_for_timings(second_run, reference_run):
    ours = second_run / "run" / "results" / "geometric.csv"
    theirs = reference_run[0] / "run" / "results" / "geometric.csv"
    assert _without_timing(ours) == _without_timing(theirs)
    assert _cached_arrays(second_run / "cache") == _cached_arrays(reference_run[0] / "cache")


def test_the_same_config_twice_gives_byte_identical_results_files(second_run, reference_run):
    assert (second_run / "run" / "results" / "geometric.csv").read_bytes() == \
        (reference_run[0] / "run" / "results" / "geometric.csv").read_bytes()


# -- caches and checkpoints never run code --------------------------------------------------------------

class _Payload:
    """Unpickling this creates the folder ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_every_load_in_the_package_refuses_pickles():
    calls = {"torch.load": 0, "np.load": 0}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(import pickle|from pickle)", text, re.M):  # only behind a class-restricted unpickler
            assert re.search(r"def find_class\(self, module.*\n(.*\n){0,12}.*raise pickle\.UnpicklingError", text), \
                f"{path.name} imports pickle without a restricted find_class"
        assert not re.search(r"^\s*(import joblib|import dill)", text, re.M), path.name
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path.name
        for fn in calls:
            for m in re.finditer(re.escape(fn) + r"\(", text):
                call = text[m.start():text.index("\n", text.index(")", m.end()))]
                needed = "weights_only=True" if fn == "torch.load" else "allow_pickle=False"
                assert needed in call, f"{path.name}: {call!r} lacks {needed}"
                calls[fn] += 1
    assert calls["torch.load"] >= 3 and calls["np.load"] >= 1  # the checks above did look at real calls


def test_a_pickle_in_the_feature_cache_is_rejected_not_run(tmp_path):
    cache, marker = FeatureCache(tmp_path / "c"), tmp_path / "ran"
    key = "ab" * 32
    cache.path(key).parent.mkdir(parents=True)
    with cache.path(key).open("wb") as f:
        np.save(f, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    assert cache.get(key) is None and cache.rejected == 1 and not cache.path(key).exists()
    assert not marker.exists()


def test_a_pickle_as_backbone_weights_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"conv_stem.weight": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        create_model("tf_efficientnet_lite0", str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_a_pickle_as_a_trained_map_is_refused_and_the_map_retrained(tmp_path, photo_dir):
    config = RunConfig(chapter="masking", manipulations=["grayscale"], layers=["blocks.6"], images=str(photo_dir),
                       image_size=96, mappings=["mlp"], max_epochs=2, bootstrap=20, threads=1,
                       cache_dir=str(tmp_path / "c"))
    first = run_chapter(config).table
    (saved,) = [p for p in (tmp_path / "c" / "maps").glob("*.pt")]
    marker = tmp_path / "ran"
    torch.save({"model": _Payload(marker), "history": {}}, saved)
    partial = saved.with_name(saved.name.replace(".pt", ".partial.pt"))
    torch.save({"net": _Payload(marker)}, partial)  # a planted resume checkpoint is refused too
    shutil.rmtree(tmp_path / "c" / "scores")  # cached scores would spare the map file a read; make the run read it
    again = run_chapter(config).table  # both are discarded unrun, and the map is trained again from scratch
    assert not marker.exists()
    timed = first.metric.isin(TIMING_METRICS)
    pd.testing.assert_frame_equal(again[~timed], first[~timed])  # retrained to the same map
    torch.load(saved, map_location="cpu", weights_only=True)  # the planted file was replaced by a real map


# -- no network at all ------------------------------------------------------------------------------------

def test_a_chapter_runs_with_no_network_at_all(tmp_path, photo_dir):
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not available here (needs root or user namespaces): no network-free run")
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('pypi.org', 443), timeout=3)\n"
            "    raise SystemExit('the network is reachable: this check proves nothing')\n"
            "except OSError:\n"
            "    pass\n"
            "from featmap.run.config import RunConfig\n"
            "from featmap.run.chapter import run_chapter\n"
            f"t = run_chapter(RunConfig(chapter='geometric', manipulations=['mirror_h'], layers=['blocks.6'],"
            f" images={str(photo_dir)!r}, image_size=96, mappings=['identity', 'linear_sgd'], threads=1,"
            f" max_epochs=1, bootstrap=20, cache_dir={str(tmp_path / 'c')!r})).table\n"
            "assert set(t[t.metric == 'cos_mean'].mapping) == {'identity', 'linear_sgd'}, t\n"
            "print('OFFLINE_OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the real, network-trying defaults
    env["FEATMAP_RESULTS"] = str(tmp_path / "results")
    out = subprocess.run([unshare, "-n", sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OFFLINE_OK" in out.stdout, out.stderr[-3000:]
