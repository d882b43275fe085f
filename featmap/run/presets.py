"""The chapters' parameters, defined once: which RunConfig parameters each chapter shows, its own defaults, its own
extra parameters, and every parameter's one-line comment. The notebooks' parameters cells are generated from this
(``python -m featmap params --write``; a test checks they have not drifted); the command line and the tests read
it, never the notebooks' JSON."""
from __future__ import annotations

import difflib
import pprint
import textwrap
import types
from dataclasses import MISSING, dataclass, field, fields

from featmap.run.config import DOCS, INVERTER_MANIPULATIONS, RunConfig

LINE = 120  # the longest line of a parameters cell
COMMON = ["backbone", "weights", "layers", "images", "skip_bad_images", "max_images", "image_size", "mappings",
          "ridge", "semantic_layers", "learned_layers", "map_size", "start", "max_steps", "patience", "eval_every",
          "plateau_steps", "max_epochs", "lr", "train_batch",
          "test_fraction", "val_fraction", "train_views", "seed", "batch_size", "device", "threads", "bootstrap",
          "cache_dir", "image_layers", "image_mappings", "image_photos", "inverter_size", "inverter_epochs",
          "inverter_precision", "inverter_manipulations"]


@dataclass(frozen=True)
class Preset:
    """A chapter's parameters: RunConfig names shown (in order), its own defaults, and its extra parameters."""

    shown: list[str]
    defaults: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)        # name -> (default, one-line comment); not RunConfig's
    docs: dict = field(default_factory=dict)         # comments that differ from DOCS for this chapter


GEOMETRIC = ["rotation_90", "rotation_180", "rotation_270", "mirror_h", "mirror_v", "noise_40", "hue_shift_60",
             "grayscale"]
MASKS = ["mask_top_left_square", "mask_bottom_right_square", "mask_big_square_center", "mask_small_square_center"]
PRESETS = {
    "geometric": Preset(["manipulations", *COMMON[:8], "spatial", "control_edits", *COMMON[8:]],
                        {"manipulations": GEOMETRIC, "control_edits": "default"}),
    "masking": Preset(["manipulations", *COMMON], {"manipulations": MASKS}),
    "semantic": Preset(
        ["manipulations", "editor_params", "edit_manifest", *COMMON],
        {"manipulations": ["object_recolor", "object_recolor_red", "object_gray", "object_blur", "object_remove",
                           "style_5", "style_11", "object_style_5", "object_style_11", "background_swap",
                           "object_paste"], "train_views": 1},
        docs={"manipulations": "editor names (featmap.edits.editors.EDITORS.names()), manifest edit names, or "
                               "manipulations; background_swap and object_paste borrow another photo: controls",
              "train_views": "views per training photo (1 here: each semantic edit costs an object mask and an edit "
                             "per view)"}),
    "layers": Preset(
        ["backbone", "weights", "layers", "manipulations", "images", "max_images", "train_views", "ridge", "seed",
         "batch_size", "device", "threads", "bootstrap", "cache_dir"],
        {"layers": "stages", "manipulations": GEOMETRIC + MASKS, "max_images": 100, "train_views": 1,
         "bootstrap": 200},
        extra={"control_weights": ("random", "the control: seeded untrained weights of the same architecture "
                                              "(None: no control)"),
               "ranks": ([1, 2, 4, 8, 16, 32, 64, 128],
                         "rank-k truncations of W - I to score (k below the layer's C)")},
        docs={"layers": "stages: every stage in the model's feature_info; or a list of timm module names",
              "manipulations": "all three families",
              "max_images": "a seeded subset of the photos, to keep seven layers x two weight sets inside the CPU "
                            "budget (None: all)",
              "train_views": "views per training photo (1: the centre crop only)"}),
    "backbones": Preset(
        ["manipulations", "backbone", "layers", "images", "max_images", "test_fraction", "val_fraction", "mappings",
         "learned_layers", "map_size", "start", "max_steps", "patience", "eval_every", "plateau_steps", "max_epochs",
         "lr", "train_batch", "train_views", "seed", "batch_size", "device", "threads", "bootstrap", "cache_dir"],
        {"manipulations": ["rotation_90", "grayscale", "mask_big_square_center"],
         "max_images": 100, "test_fraction": 0.4, "train_views": 1, "learned_layers": "all", "image_layers": [],
         "bootstrap": 500, "train_batch": 8, "map_size": "tiny",
         "mappings": ["identity", "additive", "linear", "transformer"]},
        extra={"second_backbone": ("dinov2_small", "the transformer: DINOv2 ViT-S/14 (offline weights; no classifier "
                                                   "head)"),
               "second_layers": (["blocks.3", "blocks.7", "blocks.11"], "its layers at the same relative depths "
                                                                        "(early, middle, late)")},
        docs={"max_images": "a seeded subset of the photos: the transformer extracts about 5 images/s on 2 cores",
              "test_fraction": "share of photos held out for testing: 40 of 100, so each verdict rests on 40 test "
                               "photos",
              "train_batch": "trained maps: pairs per step (8: a step at Lite0 blocks.2 holds 6,272 tokens of "
                             "attention)",
              "manipulations": "one edit per family: the depth trend is decided per edit and network",
              "map_size": "the global map at every depth: tiny (one attention layer of width 32) trains to "
                          "convergence at 784 tokens on a CPU core; small or reference on a GPU",
              "mappings": "registry names (the global transformer map is the comparison the depth trend needs)",
              "learned_layers": "trained maps at every layer: the gap to the global map by depth needs three"}),
    "summary": Preset([], extra={
        "min_effect_share": (0.1, "claim 1: the minimum gain over the no-learning floor, as a share of its headroom "
                                  "(1 - floor)"),
        "nothing_left": (0.02, "claim 1: a floor this close to the ceiling 1 on validation photos leaves nothing to "
                               "learn (set apart)"),
        "tolerance_cos": (0.02, "claim 2: close when the paired interval of linear - best valid global lies above "
                                "minus this (cos_mean; cos_changed_mean on local edits)"),
        "tolerance_ssim": (0.02, "claim 2: the same for SSIM of the reconstructions, where the judge can see"),
        "tolerance_jsd": (0.02, "semantic consistency: the same for the Jensen-Shannon divergence in bits")}),
}


def _run_default(name: str):
    f = next(f for f in fields(RunConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def defaults(chapter: str) -> dict:
    """Returns every parameter of ``chapter`` with its default value, in the order its parameters cell shows."""
    preset = preset_of(chapter)
    out = {name: preset.defaults.get(name, _run_default(name)) for name in preset.shown}
    return {**out, **{name: value for name, (value, _) in preset.extra.items()}}


def preset_of(chapter: str) -> Preset:
    if chapter not in PRESETS:
        raise ValueError(f"unknown chapter {chapter!r}; chapters with parameters: {', '.join(PRESETS)}")
    return PRESETS[chapter]


def parameters_cell(chapter: str) -> str:
    """Returns the source of ``chapter``'s parameters cell: every parameter, its default and its comment."""
    preset = preset_of(chapter)
    lines = ["# Parameters (papermill: -p name value, or -y 'name: value' for lists). One line each."]
    for name, value in defaults(chapter).items():
        doc = preset.extra[name][1] if name in preset.extra else preset.docs.get(name, DOCS[name])
        line = f"{name} = {value!r}  # {doc}"
        if len(line) > LINE:  # a long value: its comment above it, the value wrapped inside its brackets
            line = "\n".join([*textwrap.wrap(doc, LINE - 2, initial_indent="# ", subsequent_indent="# "),
                               f"{name} = " + pprint.pformat(value, width=LINE - len(name) - 3, compact=True)
                               .replace("\n", "\n" + " " * (len(name) + 3))])
        lines.append(line)
    return "\n".join(lines)


# Names a notebook namespace holds besides its parameters.
_NOT_PARAMETERS = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def given(namespace: dict) -> dict:
    """Returns the parameters in a notebook's ``namespace``: its plain values (not modules, functions, classes,
    IPython's own names or UPPER_CASE constants such as a chapter's CHAPTER)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and k not in _NOT_PARAMETERS
            and not k.isupper() and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def check_names(chapter: str, values: dict) -> None:
    """Raises for a parameter ``chapter`` does not take, naming the nearest known one."""
    known = list(defaults(chapter))
    for name in values:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown parameter {name!r} for the {chapter} chapter{hint} Known: {', '.join(known)}")


def chapter_config(chapter: str, values: dict | None = None) -> tuple[RunConfig | None, dict]:
    """Returns (the RunConfig of ``chapter`` with ``values`` over its defaults, its extra parameters).

    Unknown names are refused with the nearest known one; every value is checked before any photo or model
    loads. The layers chapter's ``layers: stages`` becomes the backbone's stage names; the summary chapter has no
    RunConfig (None).
    """
    values = dict(values or {})
    check_names(chapter, values)
    merged = {**defaults(chapter), **values}
    preset = preset_of(chapter)
    extra = {name: merged.pop(name) for name in preset.extra}
    if not preset.shown:
        return None, extra
    if chapter == "backbones":
        merged["image_layers"] = []  # image space is judged in the family chapters; here the two networks
    if chapter == "layers":
        if merged["layers"] == "stages":
            from featmap.run.layers import stage_names

            merged["layers"] = stage_names(merged["backbone"])
        from featmap.run.layers import layers_config

        return layers_config(RunConfig(chapter=chapter, **{**merged, "mappings": ["identity", "linear"]})), extra
    return RunConfig(chapter=chapter, **merged), extra


__all__ = ["DOCS", "PRESETS", "INVERTER_MANIPULATIONS", "chapter_config", "check_names", "defaults", "given",
           "parameters_cell"]
