"""Generative editors on tiny random-weights diffusers pipelines: the real editing and loading code,
offline, seeded per image whatever the order; missing weights say how to provide them."""
from __future__ import annotations

import numpy as np
import pytest

from featmap.edits.editors import get_editor
from featmap.edits.generative import (
    PROMPTS,
    WeightsNotFound,
    load_pipeline,
    resolve_prompt,
    tiny_pipeline,
)
from featmap.edits.semantic import grow


@pytest.fixture(scope="module")
def pix2pix():
    return tiny_pipeline("instruct_pix2pix")


def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"synth/{i}.png#0": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(2)}


def editor(pipe, tmp_path, **kw):
    settings = {"prompt": "make it blue", "steps": 2, "size": 32, "pipeline": pipe, "weights_id": "tiny-random",
                "cache_root": tmp_path, **kw}
    return get_editor("instruct_pix2pix", **settings)


def test_seeded_per_image_whatever_the_order(pix2pix, tmp_path):
    imgs = images()
    forward = editor(pix2pix, tmp_path / "a")
    backward = editor(pix2pix, tmp_path / "b")
    out_f = {k: forward(v, 7, k) for k, v in imgs.items()}
    out_b = {k: backward(v, 7, k) for k, v in reversed(list(imgs.items()))}
    for k, img in imgs.items():
        assert out_f[k].shape == img.shape and out_f[k].dtype == np.uint8  # resized back from 32 px
        assert np.array_equal(out_f[k], out_b[k])
    a, b = imgs.values()
    assert not np.array_equal(forward(a, 7, "synth/x.png#0"), forward(a, 8, "synth/x.png#0"))  # the seed matters
    assert forward.edits_made == 4
    rerun = editor(pix2pix, tmp_path / "a")
    for k, img in imgs.items():
        assert np.array_equal(rerun(img, 7, k), out_f[k])
    assert (rerun.edits_made, rerun.cache_hits) == (0, 2)


def test_a_saved_pipeline_loads_from_its_folder_and_edits_the_same(pix2pix, tmp_path):
    folder = tmp_path / "weights"
    pix2pix.save_pretrained(folder)
    loaded = load_pipeline("instruct_pix2pix", str(folder), device="cpu")
    assert loaded.unet.dtype.is_floating_point and str(loaded.device) == "cpu"
    img = images()["synth/0.png#0"]
    from_folder = get_editor("instruct_pix2pix", prompt="make it blue", steps=2, size=32, weights=str(folder),
                             device="cpu", cache_root=tmp_path / "c")
    injected = editor(pix2pix, tmp_path / "d")
    assert np.array_equal(from_folder(img, 1, "synth/0.png#0"), injected(img, 1, "synth/0.png#0"))
    key = from_folder.cache_key(1)
    assert key["weights"] == str(folder.resolve()) and key["dtype"] == "torch.float32"


def test_inpainting_changes_only_the_object():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 <= 12 ** 2
    img = np.where(disc[..., None], [220, 40, 40], [100, 130, 90]) + rng.normal(0, 8, (48, 48, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)  # a red ball on a green field, the ball in the middle
    edit = get_editor("inpaint", prompt="a blue ball", steps=2, size=32, pipeline=tiny_pipeline("inpaint"),
                      weights_id="tiny-random-inpaint")
    out = edit(img, 0, "synth/p.png#0")
    assert edit.mask(img).ok
    region = grow(edit.mask(img).mask, edit.params["grow_mask"])
    diff = (out != img).any(axis=2)
    assert diff.any() and not (diff & ~region).any()


def test_cache_key_follows_prompt_settings_and_weights(pix2pix, tmp_path):
    base = editor(pix2pix, tmp_path).cache_key(0)
    assert base != editor(pix2pix, tmp_path, prompt="make it red").cache_key(0)
    assert base != editor(pix2pix, tmp_path, steps=3).cache_key(0)
    assert base != editor(pix2pix, tmp_path, weights_id="other").cache_key(0)
    assert base != editor(pix2pix, tmp_path, image_guidance_scale=2.0).cache_key(0)
    assert base != editor(pix2pix, tmp_path).cache_key(1)
    with pytest.raises(TypeError, match="true_cfg_scale"):
        editor(pix2pix, tmp_path, true_cfg_scale=4.5)
    with pytest.raises(ValueError, match="weights_id"):
        get_editor("instruct_pix2pix", prompt="car_blue", pipeline=pix2pix)
    with pytest.raises(ValueError, match="weights_id"):
        get_editor("instruct_pix2pix", prompt="car_blue", weights_id="not the weights")


def test_missing_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"hf download featmap-tests/absent-model.*weights='<that folder>'"):
        load_pipeline("qwen_image_edit", "featmap-tests/absent-model")
    with pytest.raises(WeightsNotFound, match="does not exist"):
        load_pipeline("inpaint", str(tmp_path / "nowhere"))
    edit = get_editor("qwen_image_edit", prompt="car_blue", weights="featmap-tests/absent-model")
    with pytest.raises(WeightsNotFound, match="hf download"):
        edit.cache_key(0)


def test_reference_prompts_by_name_and_settings():
    short, text = resolve_prompt("Change_body_color_blue")
    assert short == "car_blue" and text == PROMPTS["car_blue"][1]
    assert text.startswith("Change the car's body color to bright blue")
    assert resolve_prompt("bird_blue")[1].startswith("Change only the birds plumage color to bright blue")
    assert resolve_prompt("add a teddy bear") == ("add_a_teddy_bear", "add a teddy bear")
    with pytest.raises(ValueError, match="unknown prompt name 'car_bleu'"):
        resolve_prompt("car_bleu")
    qwen = get_editor("qwen_image_edit", prompt="car_blue")  # nothing is loaded before the first edit
    assert qwen.name == "qwen_image_edit_car_blue"
    assert qwen.steps == 10 and qwen.size is None
    assert qwen.call_settings == {"true_cfg_scale": 4.5, "guidance_scale": 1.0, "negative_prompt": " "}

