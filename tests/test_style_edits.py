"""Neural style edits: the torch ports against onnxruntime, strength, the object scope, the edit cache, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from featmap.data.images import ImageSet, Photo, View, load_rgb
from featmap.edits import style as st
from featmap.edits import style_networks as sn
from featmap.edits.editors import EDITORS, get_editor, is_control
from featmap.edits.segmentation import ObjectMask
from featmap.edits.semantic import SkippedItem

ort = pytest.importorskip("onnxruntime")  # the reference, a test-only dependency
pytestmark = pytest.mark.usefixtures("module_one_thread")

PICTURE = "sklearn/flower.jpg"  # an embedded photo used as a style picture
PHOTOS = ["skimage/astronaut.png", "skimage/chelsea.png", "foolbox/imagenet_00_243.jpg"]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Three real photos as the chapters see them: 224 px square views."""
    by_id = {p.id: p for p in ImageSet.default().photos}
    return {i: np.array(ImageSet.view(View(by_id[i], 0), 224)) for i in PHOTOS}


def session(kind: str, optimised: bool = True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimised:  # run the graph's nodes as written (no fused integer kernels)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(sn.model_file(kind)), options, providers=["CPUExecutionProvider"])


def change(a: np.ndarray, b: np.ndarray) -> float:
    """Returns the mean absolute difference of two uint8 images in [0, 255] units."""
    return float(np.abs(a.astype(np.int16) - b).mean())


# -- the ports -------------------------------------------------------------------------------------

def test_multistyle_port_matches_onnxruntime(photos):
    image = photos["skimage/astronaut.png"]
    x = image.astype(np.float32).transpose(2, 0, 1)[None] / 255
    net = sn.networks("cpu")
    for weights in ({7: 1.0}, {3: 0.5, 12: 0.5}):
        w = np.zeros(26, np.float32)
        for i, v in weights.items():
            w[i] = v
        ref = session("multistyle").run(None, {"image": x, "style_weights": w})[0]
        import torch

        out = net.builtin(torch.from_numpy(x), torch.from_numpy(w)).numpy()
        assert out.shape == ref.shape == (1, 3, 224, 224)
        assert np.abs(out - ref).max() * 255 < 0.01  # in [0, 255] pixel units (measured 7e-4)
        assert change(st.restyle_builtin(image, weights, "cpu"), image) > 20  # and it does restyle


def _every_node_output(kind: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns onnxruntime's value of every tensor of the ``kind`` graph (run as written) for ``feeds``."""
    import onnx

    model = onnx.load(str(sn.model_file(kind)))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in model.graph.node
                              if n.output[0] not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {**feeds, **dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))}


@pytest.mark.parametrize("kind", ["predict", "transform"])
def test_quantized_graphs_compute_every_node_as_onnxruntime_does(photos, kind):
    """Each node of the int8 graphs, fed onnxruntime's own inputs, gives onnxruntime's output: quantised tensors
    exactly, the rest to float rounding. (End to end the two differ more: see the next test.)"""
    import torch

    graph = sn.QuantizedGraph.from_onnx(kind)
    side = sn.PREDICT_SIZE if kind == "predict" else sn.TRANSFORM_SIZE
    image = st._lanczos(photos["skimage/chelsea.png"], (side, side)).astype(np.float32)[None] / 255
    feeds = dict(zip(graph.input_names, [image, np.random.default_rng(0).normal(0, 1, (1, 1, 1, 100))
                                         .astype(np.float32)]))
    ref = _every_node_output(kind, feeds)
    constants = {name: getattr(graph, f"c{i}") for i, name in enumerate(graph._constant_names)}
    ops = set()
    for op, names, out, attrs in graph.steps:
        args = [constants[n] if n in constants else torch.from_numpy(np.asarray(ref[n])) if n else None for n in names]
        got, want = sn.OPS[op](*args, **attrs).numpy().astype(np.float64), np.asarray(ref[out], np.float64)
        assert got.shape == want.shape, f"{op} {out}"
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite) and np.array_equal(got[~finite], want[~finite]), f"{op} {out}"
        err = np.abs(got[finite] - want[finite]).max(initial=0) / max(np.abs(want[finite]).max(initial=0), 1e-12)
        assert err <= (0 if op in ("QuantizeLinear", "DequantizeLinear", "Pad", "Resize") else 1e-3), f"{op} {out}"
        ops.add(op)
    assert ops >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


def test_arbitrary_port_matches_onnxruntime_as_closely_as_onnxruntime_matches_itself(photos):
    """The int8 graphs amplify float rounding: a variance one step across a rounding boundary rescales a whole
    channel. onnxruntime's fused integer kernels and its literal run of the same graph differ by 4.7-7.9 of 255 on
    average (five 224 px photos); the port differs from either by as much, never more than 8."""
    image, picture = photos["skimage/chelsea.png"], load_rgb(st.resolve_picture(PICTURE).path)
    side = min(picture.shape[:2])
    top, left = (picture.shape[0] - side) // 2, (picture.shape[1] - side) // 2
    square = st._lanczos(picture[top:top + side, left:left + side], (256, 256)).astype(np.float32)[None] / 255
    content = st._lanczos(image, (384, 384)).astype(np.float32)[None] / 255
    outputs, vectors = {}, {}
    for optimised in (True, False):
        predict, transform = session("predict", optimised), session("transform", optimised)
        vectors[optimised] = predict.run(None, {predict.get_inputs()[0].name: square})[0]
        names = [i.name for i in transform.get_inputs()]
        out = transform.run(None, {names[0]: content, names[1]: vectors[optimised]})[0][0]
        outputs[optimised] = st._lanczos((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), (224, 224))
    vector = st.style_vector(picture, "cpu")
    step = 0.0199  # the predictor's output quantisation step
    assert np.abs(vector - vectors[True].ravel()).max() <= 2 * step + 1e-6
    port = st.restyle_arbitrary(image, vector, "cpu")
    own_spread = change(outputs[True], outputs[False])
    assert change(port, outputs[True]) <= min(8.0, 1.5 * own_spread)
    assert change(port, image) > 4 * change(port, outputs[True])  # the style's change is far larger


# -- strength ----------------------------------------------------------------------------------------

def test_strength_zero(photos):
    image = photos["skimage/chelsea.png"]
    assert np.array_equal(get_editor("style_7", strength=0, device="cpu")(image, 0, "a#0"), image)  # exactly
    assert np.array_equal(get_editor("style", style={3: 1, 12: 2}, strength=0, device="cpu")(image, 0, "a#0"), image)
    own = get_editor("style", style=PICTURE, strength=0, device="cpu")(image, 0, "a#0")
    assert np.array_equal(own, st.restyle_arbitrary(image, st.style_vector(image, "cpu"), "cpu"))  # its own style
    assert 5 < change(own, image) < 40  # 20-36 on ten embedded photos (this one 15.7): a repaint, not the photo


def test_more_strength_changes_the_photo_more(photos):
    picture = st.style_vector(load_rgb(st.resolve_picture(PICTURE).path), "cpu")
    for image in photos.values():
        learned = [change(get_editor("style_7", strength=s, device="cpu")(image, 0, "a#0"), image)
                   for s in (0, 0.25, 0.5, 0.75, 1)]
        assert learned[0] == 0 and np.all(np.diff(learned) > 5), learned
        own = st.style_vector(image, "cpu")
        out = {s: st.restyle_arbitrary(image, s * picture + (1 - s) * own, "cpu") for s in (0, 0.5, 1)}
        # from the photo, from half strength up (below it the own-style repaint can move away from the photo)
        assert change(out[0.5], image) < change(out[1], image)
        # from the photo in its own style, all the way
        assert 0 < change(out[0.5], out[0]) < change(out[1], out[0])
    edit = get_editor("style", style=PICTURE, strength=0.5, device="cpu")
    assert np.array_equal(edit(image, 0, "a#0"), out[0.5])  # the editor blends style vectors, not pixels


# -- the object scope --------------------------------------------------------------------------------

def _disc_photo(photos) -> tuple[np.ndarray, np.ndarray]:
    image = photos["skimage/astronaut.png"]
    yy, xx = np.mgrid[:224, :224]
    return image, (yy - 100) ** 2 + (xx - 120) ** 2 <= 60 ** 2


@pytest.mark.parametrize("name,params", [("object_style_7", {}), ("object_style_19_50", {}),
                                         ("object_style", {"style": PICTURE, "strength": 0.75})])
def test_object_scope_changes_only_inside_the_mask(photos, monkeypatch, name, params):
    image, disc = _disc_photo(photos)
    edit = get_editor(name, device="cpu", **params)
    monkeypatch.setattr(edit, "mask", lambda img: ObjectMask(disc, float(disc.mean()), True))
    out = edit(image, 0, "a#0")
    moved = (out != image).any(axis=2)
    assert np.array_equal(out[~disc], image[~disc])  # outside: bit for bit
    assert moved[disc].mean() > 0.8  # inside: restyled
    whole = get_editor(name.replace("object_", ""), device="cpu", **params)(image, 0, "a#0")
    assert np.array_equal(out[disc], whole[disc])  # the same pixels as the whole-photo edit


def test_a_photo_without_a_usable_mask_is_skipped_with_the_reason(tmp_path, photos):
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    Image.fromarray(photos["skimage/chelsea.png"]).save(tmp_path / "cat.png")
    views = [View(Photo(id=f"t/{n}", path=tmp_path / n, source="t", label="", licence="", sha256=n), 0)
             for n in ("flat.png", "cat.png")]
    edit = get_editor("object_style_3", device="cpu").bind(views, lambda v: load_rgb(v.photo.path))
    assert edit.usable(views) == views[1:]
    assert "object mask failed" in edit.skipped["t/flat.png#0"] and edit.skipped_kinds["t/flat.png#0"]
    with pytest.raises(SkippedItem, match="object mask failed"):
        edit(load_rgb(views[0].photo.path), 0, views[0].key)
    assert get_editor("style_3", device="cpu").bind(views, lambda v: load_rgb(v.photo.path)).usable(views) == views


# -- cache and determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("style_7_75", {}), ("object_style", {"style": PICTURE, "strength": 0.5})])
def test_a_rerun_computes_nothing_and_a_fresh_run_gives_the_same_pixels(photos, tmp_path, monkeypatch, name, params):
    image = photos["skimage/chelsea.png"]
    first = get_editor(name, device="cpu", cache_root=tmp_path / "a", **params)
    out = first(image, 0, "cat#0")
    fresh = get_editor(name, device="cpu", cache_root=tmp_path / "b", **params)
    assert np.array_equal(fresh(image, 0, "cat#0"), out)  # computed again from scratch: the same pixels
    assert first.edits_made == fresh.edits_made == 1

    def no_network(*args, **kwargs):
        raise AssertionError("a network ran on a cached edit")

    import featmap.edits.segmentation as segmentation

    for target in ("builtin", "style_vector", "arbitrary"):
        monkeypatch.setattr(sn.StyleNetworks, target, no_network)
    monkeypatch.setattr(segmentation, "grabcut_mask", no_network)
    rerun = get_editor(name, device="cpu", cache_root=tmp_path / "a", **params)
    assert np.array_equal(rerun(image, 0, "cat#0"), out)
    assert (rerun.edits_made, rerun.cache_hits) == (0, 1)
    with pytest.raises(AssertionError, match="a network ran"):  # and the patch does stop a real computation
        get_editor(name, device="cpu", cache_root=tmp_path / "c", **params)(image, 0, "cat#0")


def test_cache_key_follows_style_strength_scope_and_picture(tmp_path):
    keys = [get_editor(n, device="cpu", **p).cache_key(0) for n, p in
            [("style_7", {}), ("style_7", {"strength": 0.5}), ("style_7_50", {}), ("style_8", {}),
             ("object_style_7", {}), ("style", {"style": 7}), ("style", {"style": PICTURE})]]
    assert len({str(k) for k in keys}) == len(keys)
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(picture)
    before = get_editor("style", style=str(picture), device="cpu").cache_key(0)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(picture)  # same path, other pixels
    assert get_editor("style", style=str(picture), device="cpu").cache_key(0) != before
    assert keys[0] == get_editor("style_7", device="cpu").cache_key(3)  # deterministic: the seed is not in it


# -- names, parameters, bad input --------------------------------------------------------------------

def test_names_resolve_to_their_style_and_strength():
    for prefix in ("style", "object_style"):
        assert all(EDITORS.has(f"{prefix}{s}") for s in ("", "_0", "_25", "_25_75", "_3_50", "_3_5"))
        assert not EDITORS.has(f"{prefix}_x") and not is_control(f"{prefix}_3")
        assert f"{prefix}_<index 0-25>" in EDITORS.names()  # the form is listed, not 26 x 101 names
    half = get_editor("style_3_50")
    assert (half.name, half.params) == ("style_3_50", {"network": "multistyle26", "style": 3, "strength": 0.5})
    blend = get_editor("object_style", style={"3": 1, 12: 3}, strength=0.2, margin=0.2)
    assert blend.name == "object_style" and blend.needs_mask
    assert blend.params == {"network": "multistyle26", "style": {3: 0.25, 12: 0.75}, "strength": 0.2,
                            "mask_margin": 0.2, "mask_iterations": 5}
    picture = get_editor("style", style=PICTURE)
    assert picture.params["network"] == "arbitrary" and picture.picture.photo_id == PICTURE
    with pytest.raises(ValueError, match="index must be an integer in 0-25"):
        get_editor("style_26")
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        get_editor("style_3_150")
    with pytest.raises(TypeError, match="style_7_50"):
        get_editor("style_7_50", strength=0.3)  # the name fixes it
    with pytest.raises(TypeError, match="margin"):
        get_editor("style_7", margin=0.2)  # no mask in the photo scope
    with pytest.raises(TypeError, match="style"):
        get_editor("style")  # which style must be said


def test_a_chapter_config_accepts_the_names():
    from featmap.run.config import RunConfig

    config = RunConfig(chapter="semantic", manipulations=["style_7", "style_7_50", "object_style_7", "style"],
                       editor_params={"style_7": {"strength": 0.9}, "style": {"style": PICTURE, "strength": 0.5}})
    assert config.families() == ["semantic"]


def test_the_style_picture_can_be_checked_against_the_test_photos():
    images = ImageSet.default()
    flower = next(p for p in images.photos if p.id == PICTURE)
    edit = get_editor("style", style=PICTURE)
    edit.check_held_out([p for p in images.photos if p.id != PICTURE])
    with pytest.raises(ValueError, match="sklearn/flower.jpg"):
        edit.check_held_out([flower])
    by_path = get_editor("style", style=str(flower.path))  # the same picture by path: caught by its bytes
    assert by_path.picture.photo_id is None
    with pytest.raises(ValueError, match="kept out"):
        by_path.check_held_out([flower])
    get_editor("style_3").check_held_out([flower])  # learned styles take no picture


def test_bad_input_is_named_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("networks were read before the input was checked")

    monkeypatch.setattr(sn, "networks", no_work)
    monkeypatch.setattr(st, "networks", no_work)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases = [
        (dict(style=26), ValueError, r"style index must be an integer in 0-25.*got 26"),
        (dict(style=-1), ValueError, r"0-25.*got -1"),
        (dict(style=2.5), TypeError, r"style must be an index in 0-25"),
        (dict(style=7, strength=1.5), ValueError, r"strength must be a number in \[0, 1\].*got 1.5"),
        (dict(style=7, strength=-0.1), ValueError, r"strength must be a number in \[0, 1\]"),
        (dict(style=7, strength="full"), ValueError, r"strength must be a number in \[0, 1\]"),
        (dict(style=str(tmp_path / "gone.png")), FileNotFoundError, r"style picture .*gone\.png.* is neither"),
        (dict(style="foolbox/no_such_photo.jpg"), FileNotFoundError, r"embedded photo set"),
        (dict(style=str(tmp_path / "broken.png")), ValueError, r"style picture .*broken\.png.* cannot be decoded"),
        (dict(style={3: -1, 4: 2}), ValueError, r"weights must be finite numbers >= 0, got -1 for style 3"),
        (dict(style={3: 0, 4: 0}), ValueError, r"weights sum to 0"),
        (dict(style={30: 1}), ValueError, r"style blend index must be an integer in 0-25"),
        (dict(style={}), ValueError, r"blend is empty"),
    ]
    for params, error, message in cases:
        for name in ("style", "object_style"):
            with pytest.raises(error, match=message):
                get_editor(name, **params)
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        get_editor("object_style_3", strength=2)


def test_odd_sizes_keep_their_shape(photos):
    image = photos["skimage/chelsea.png"][:, :150][:, :, :]
    image = np.ascontiguousarray(image[:97])  # 97 x 150: not a multiple of 4, not square
    for edit in (get_editor("style_5", device="cpu"), get_editor("style", style=PICTURE, device="cpu")):
        out = edit(image, 0, "odd#0")
        assert out.shape == image.shape and change(out, image) > 10
