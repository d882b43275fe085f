"""Generative editors through diffusers: InstructPix2Pix, Qwen-Image-Edit, mask-guided inpainting.

Weights come from a local folder or the local Hugging Face cache only (nothing is downloaded). Each image
gets its own generator seeded from (seed, item), so an edit does not depend on processing order; the
output is resized to the input's size. ``tiny_pipeline`` builds a random-weights pipeline from
diffusers config classes that runs through the same code path offline: a smoke test, not an edit.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featmap.core.io import content_key
from featmap.core.seeding import torch_generator_for
from featmap.edits.semantic import SemanticEdit, SkippedItem, grow

# Verbatim prompts of the reference protocol (section 2.2), by short name; the reference's own keys
# (e.g. Change_body_color_blue) are accepted too.
PROMPTS = {
    "car_blue": ("Change_body_color_blue",
                 "Change the car's body color to bright blue, while maintaining the exact same lighting, "
                 "reflections, background, and all other details."),
    "car_no_mirrors": ("Remove_side_mirrors",
                       "Remove the car's side mirrors in a realistic photo style, while keeping the car's body, "
                       "lighting, reflections, and background identical."),
    "car_headlights": ("Turn_on_headlights",
                       "Turn on the car's headlights so they appear bright and illuminated, while preserving the "
                       "car's position, lighting, color, and all background details exactly as in the original "
                       "image."),
    "car_police_lights": ("Add_police_lights",
                          "Add flashing blue and red police lights to the top of the car, making them appear "
                          "illuminated, while keeping the car's color, lighting, reflections, position, and all "
                          "background details exactly the same."),
    "car_rims_red": ("Change_tire_rim_color_red",
                     "Change the car's tire rim color to red in a realistic photo style, while keeping the car's "
                     "body, lighting, reflections, and background identical."),
    "car_remove": ("Remove_car",
                   "Remove the car from the image and fill the space naturally with background."),
    "bird_blue": ("Change_plumage_color_blue",
                  "Change only the birds plumage color to bright blue, without altering the birds species, pose, "
                  "head orientation, body shape, texture, or expression. Keep the original background, lighting, "
                  "shadows, camera angle, and image composition exactly the same."),
    "bird_open_beak": ("Open_beak_call",
                       "Edit the bird to show its beak open in a calling or singing posture, while preserving the "
                       "exact species, head direction, body pose, and limb positions. Do not change the "
                       "background, lighting, camera angle, or any other element except the mouth/beak opening."),
    "bird_preening": ("Preening_one_wing",
                      "Show the bird gently preening one wing, in the same pose and background, without changing "
                      "species or plumage."),
}


def resolve_prompt(prompt: str) -> tuple[str, str]:
    """Returns (short name, prompt text) for a named reference prompt or a literal prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"a generative editor needs a prompt: literal text or one of {', '.join(PROMPTS)}")
    for short, (reference, text) in PROMPTS.items():
        if prompt in (short, reference):
            return short, text
    if re.fullmatch(r"\w+", prompt):  # one identifier-like word is a mistyped name, not an instruction
        raise ValueError(f"unknown prompt name {prompt!r}; named prompts: {', '.join(PROMPTS)} (or the "
                         "reference's keys, e.g. Change_body_color_blue); literal prompts contain spaces")
    return re.sub(r"[^a-zA-Z0-9_]", "", prompt.replace(" ", "_"))[:50], prompt


# The reference's settings for Qwen-Image-Edit; the others are the model cards' usual settings.
KINDS = {
    "instruct_pix2pix": {"pipeline": "StableDiffusionInstructPix2PixPipeline", "repo": "timbrooks/instruct-pix2pix",
                         "steps": 20, "size": 512, "call": {"guidance_scale": 7.5, "image_guidance_scale": 1.5}},
    "qwen_image_edit": {"pipeline": "QwenImageEditPlusPipeline", "repo": "Qwen/Qwen-Image-Edit-2511",
                        "steps": 10, "size": None,
                        "call": {"true_cfg_scale": 4.5, "guidance_scale": 1.0, "negative_prompt": " "}},
    "inpaint": {"pipeline": "StableDiffusionInpaintPipeline",
                "repo": "stable-diffusion-v1-5/stable-diffusion-inpainting",
                "steps": 25, "size": 512, "call": {"guidance_scale": 7.5, "strength": 1.0}},
}


class WeightsNotFound(FileNotFoundError):
    """Editor weights that are neither a local folder nor in the local Hugging Face cache."""


def _how_to_provide(kind: str, repo: str) -> str:
    return (f"on a machine with network, run `hf download {repo}` (huggingface_hub's CLI, formerly "
            f"`huggingface-cli download {repo}`) and copy its cache folder here (HF_HOME / HF_HUB_CACHE), or "
            f"download the pipeline into a folder and pass weights='<that folder>' to {kind}")


def resolve_weights(kind: str, weights: str | None = None) -> tuple[Path, dict]:
    """Returns (local pipeline folder, identity) for a folder path or a repo id in the local HF cache."""
    if kind not in KINDS:
        raise ValueError(f"unknown generative editor kind {kind!r}; known: {', '.join(KINDS)}")
    weights = weights or KINDS[kind]["repo"]
    folder = Path(weights).expanduser()
    if folder.is_dir():
        files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
        return folder.resolve(), {"weights": str(folder.resolve()), "files": content_key(files)}
    if folder.is_absolute() or weights.startswith((".", "~")) or weights.count("/") != 1:
        raise WeightsNotFound(f"weights folder {weights!r} for {kind} does not exist; "
                              + _how_to_provide(kind, KINDS[kind]["repo"]))
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(weights, "model_index.json")
    if not isinstance(index, str):
        raise WeightsNotFound(f"weights {weights!r} for {kind} are not in the local Hugging Face cache; "
                              + _how_to_provide(kind, weights))
    snapshot = Path(index).parent
    return snapshot, {"weights": weights, "revision": snapshot.name}


def _device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[str, torch.dtype]:
    """Returns (device, dtype): CUDA and bfloat16 where available, else CPU and float32, unless given."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'bfloat16' or 'float32', got {dtype!r}")
        dtype = getattr(torch, dtype)
    return device, dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def load_pipeline(kind: str, weights: str | None = None, device: str | None = None,
                  dtype: str | torch.dtype | None = None):
    """Returns the diffusers pipeline of ``kind`` loaded from local files only, on ``device`` in ``dtype``."""
    import diffusers

    folder, _ = resolve_weights(kind, weights)
    device, dtype = _device_dtype(device, dtype)
    cls = getattr(diffusers, KINDS[kind]["pipeline"])
    try:
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsNotFound(f"could not load {kind} from {folder} ({type(e).__name__}: {e}); the files may be "
                              "incomplete; " + _how_to_provide(kind, KINDS[kind]["repo"])) from e
    vae = getattr(pipe, "vae", None)
    for switch in ("enable_slicing", "enable_tiling"):  # as the reference: large images fit in less memory
        if hasattr(vae, switch):
            getattr(vae, switch)()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class GenerativeEdit(SemanticEdit):
    made_by = "neural network (generative editor)"
    """A diffusers edit of one image by a prompt, seeded per (seed, item); ``inpaint`` edits the object
    mask only (the rest of the image is kept exactly)."""

    random = True

    def __init__(self, kind: str, prompt: str = "", weights: str | None = None, steps: int | None = None,
                 size: int | None = -1, device: str | None = None, dtype: str | None = None, pipeline=None,
                 weights_id: str | None = None, grow_mask: float = 0.02,
                 cache_root: str | Path | None = None, **settings):
        if kind not in KINDS:
            raise ValueError(f"unknown generative editor kind {kind!r}; known: {', '.join(KINDS)}")
        spec = KINDS[kind]
        unknown = set(settings) - set(spec["call"])
        if unknown:
            raise TypeError(f"{kind} takes the settings {sorted(spec['call'])}, not {sorted(unknown)}")
        short, text = resolve_prompt(prompt)
        self.kind, self.prompt, self.weights = kind, text, weights
        self.needs_mask = kind == "inpaint"
        self.steps = int(steps or spec["steps"])
        self.size = spec["size"] if size == -1 else size
        self.call_settings = {**spec["call"], **settings}
        if (pipeline is None) != (weights_id is None):
            raise ValueError("pass pipeline and weights_id together (weights_id names the pipeline's weights, so "
                             "that its edits and features are cached apart from other weights'), or neither")
        self._pipe, self.weights_id = pipeline, weights_id
        if pipeline is not None:
            self.device, self.dtype = str(pipeline.device), pipeline.dtype
        else:
            self.device, self.dtype = _device_dtype(device, dtype)
        params = {"prompt": text, "steps": self.steps, "size": self.size, **self.call_settings}
        if self.needs_mask:
            params["grow_mask"] = float(grow_mask)
        super().__init__(f"{kind}_{short}", params, cache_root=cache_root)

    def identity(self) -> dict:
        """Returns the weights' identity (repo and revision, or folder and file sizes), device and dtype."""
        weights = {"weights_id": self.weights_id} if self.weights_id else resolve_weights(self.kind, self.weights)[1]
        return {**weights, "device": torch.device(self.device).type, "dtype": str(self.dtype)}

    @property
    def pipeline(self):
        """Returns the diffusers pipeline, loaded (from local files only) on first use."""
        if self._pipe is None:
            self._pipe = load_pipeline(self.kind, self.weights, self.device, self.dtype)
        return self._pipe

    def edit(self, image: np.ndarray, seed: int, item: str) -> np.ndarray:
        h, w = image.shape[:2]
        pil = Image.fromarray(image)
        if self.size:  # the model's working resolution, shorter side, a multiple of 8
            scale = self.size / min(h, w)
            pil = pil.resize((round(w * scale / 8) * 8, round(h * scale / 8) * 8), Image.Resampling.BICUBIC)
        # A fresh CPU generator per image: the result depends on (seed, item), not on the order of calls.
        kwargs = {"prompt": self.prompt, "num_inference_steps": self.steps,
                  "generator": torch_generator_for(seed, "edit", self.name, item), **self.call_settings}
        region = None
        if self.kind == "inpaint":
            region = grow(self.mask(image).mask, self.params["grow_mask"])
            mask = Image.fromarray(region.astype(np.uint8) * 255).resize(pil.size, Image.Resampling.NEAREST)
            kwargs.update(image=pil, mask_image=mask, height=pil.height, width=pil.width)
        elif self.kind == "qwen_image_edit":
            kwargs["image"] = [pil]
        else:
            kwargs["image"] = pil
        result = self.pipeline(**kwargs)
        if any(getattr(result, "nsfw_content_detected", None) or []):
            self.skipped[item] = f"{self.name}: the pipeline's safety checker blanked the output"
            self.skipped_kinds[item] = "safety checker"
            raise SkippedItem(self.skipped[item], "safety checker")
        out = np.asarray(result.images[0].convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
        return np.where(region[..., None], out, image) if region is not None else out


def tiny_tokenizer():
    """Returns a character-level CLIPTokenizer built in memory (no download): for smoke tests only."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'!?-/":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def tiny_pipeline(kind: str = "instruct_pix2pix", seed: int = 0):
    """Returns a random-weights ``instruct_pix2pix`` or ``inpaint`` pipeline (32-channel UNet, 2-layer CLIP
    text encoder) built from diffusers config classes on the CPU: it runs the editing code path; it does
    not edit."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    # The UNet sees the noisy latents plus the image latents (InstructPix2Pix: 4 + 4) or plus the
    # masked-image latents and the mask (inpainting: 4 + 4 + 1).
    channels = {"instruct_pix2pix": 8, "inpaint": 9}
    if kind not in channels:
        raise ValueError(f"tiny pipelines exist for {', '.join(channels)}, not {kind!r}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=channels[kind],
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=16)
        vae = diffusers.AutoencoderKL(
            block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=32))
    cls = getattr(diffusers, KINDS[kind]["pipeline"])
    pipe = cls(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
               scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
