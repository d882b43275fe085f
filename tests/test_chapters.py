import re
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest
import torch

from featmap.core.table import COLUMNS, PROVENANCE_COLUMNS, results_dir
from featmap.run.chapter import run_chapter
from featmap.run.config import RunConfig

BOOK = Path(__file__).resolve().parent.parent / "book"


def small_config(photo_dir, **kw):
    return RunConfig(**{"chapter": "geometric", "manipulations": ["rotation_90", "grayscale"],
                        "layers": ["blocks.6"], "images": str(photo_dir), "bootstrap": 200,
                        "mappings": ["identity", "additive", "linear"], "image_layers": "none", **kw})


def test_run_writes_the_contract_and_reruns_from_cache(photo_dir):
    result = run_chapter(small_config(photo_dir))
    table = pd.read_csv(results_dir() / "geometric.csv")
    assert list(table.columns) == COLUMNS + PROVENANCE_COLUMNS
    views = result.config.train_views  # per training and validation photo; one per test photo
    assert result.extracted == (len(result.split.train) * views + len(result.split.val) * views
                                + len(result.split.test)) * 3
    assert set(table.family) == {"geometric", "photometric"}
    assert set(table[table.family == "photometric"].spatial) == {"none"}
    assert set(table[table.family == "geometric"].spatial) == {"none", "applied"}
    assert set(table.mapping) == {"identity", "additive", "linear", "target"}
    kinds = table[table.mapping == "target"].pivot_table(index="manipulation", columns="metric", values="value")
    assert kinds["local_edit"].to_dict() == {"grayscale": 0.0, "rotation_90": 0.0}  # no edit here names its region
    assert kinds["changed_share"].between(0, 1).all()
    cos = table[table.metric == "cos_mean"]
    assert (cos.n == len(result.split.test)).all()
    assert ((cos.ci_low <= cos.value + 1e-9) & (cos.value <= cos.ci_high + 1e-9)).all()
    assert cos.value.between(-1, 1).all()
    positions = table[(table.metric == "n_train_positions")].value.unique()
    assert list(positions) == [len(result.split.train) * views * 49]  # every map is fit on the training photos
    geometry = table[table.metric.isin(["wx_share", "bias_share", "erank_frac", "delta_erank_frac"])]
    assert set(geometry.mapping) == {"linear"} and len(geometry) == 4 * 3  # grayscale, rotation none + applied
    assert geometry.value.between(0, 10).all()

    again = run_chapter(small_config(photo_dir))
    assert again.extracted == 0  # a rerun extracts nothing
    timing = again.table.metric == "fit_seconds"
    pd.testing.assert_frame_equal(again.table[~timing].reset_index(drop=True),
                                  result.table[~timing].reset_index(drop=True))  # same config, same numbers


def test_identity_rows_are_the_direct_cosine(photo_dir):
    result = run_chapter(small_config(photo_dir, mappings=["identity"], manipulations=["rotation_90"]))
    store, test = result.store, result.split.views("test", 1)
    from featmap.edits.manipulations import get_manipulation

    rot = get_manipulation("rotation_90")
    x, y = store.load(test, None, "blocks.6"), store.load(test, rot, "blocks.6")
    import torch.nn.functional as F

    for spatial, inp in (("none", x), ("applied", rot.grid_op(x))):
        direct = F.cosine_similarity(inp.double(), y.double(), dim=1).flatten(1).mean(1).mean().item()
        row = result.table[(result.table.metric == "cos_mean") & (result.table.spatial == spatial)]
        assert row.value.item() == pytest.approx(direct, abs=1e-6)


def test_a_layer_too_small_fails_before_any_extraction(photo_dir, tmp_path):
    config = RunConfig(chapter="masking", manipulations=["mask_small_square_center"], layers=["blocks.6"],
                       image_size=64, images=str(photo_dir), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"layer blocks.6 has a 2x2 feature grid: mask_small_square_center covers"):
        run_chapter(config)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="gives a 2-D output, not a feature map"):
        run_chapter(RunConfig(chapter="masking", manipulations=["grayscale"], layers=["global_pool"],
                              images=str(photo_dir)))


# The family chapters of the small book (tests/conftest.py): each runs every map and scores image space.
FAMILY_CHAPTERS = ("geometric", "masking", "semantic")


def _ran(small_book, chapter: str) -> None:
    assert chapter not in small_book.failed, f"the {chapter} chapter failed: {small_book.failed[chapter]}"


def test_the_small_book_is_built_once_per_run(small_book):
    import conftest

    assert len(conftest.SMALL_BOOKS) == 1 and conftest.SMALL_BOOKS[0] is small_book  # browser and papermill tests


def test_every_notebook_of_the_small_book_runs_to_the_end(small_book):
    """Every notebook page of _toc.yml ran under papermill: every code cell executed, no error output."""
    problems = [f"{chapter}: {error}" for chapter, error in small_book.failed.items()]
    for page in small_book.pages:
        if not small_book.is_notebook(page):
            continue
        nb = small_book.notebook(Path(page).name)
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            if cell.get("execution_count") is None and page not in small_book.failed:
                problems.append(f"{page}: cell {i} did not run")
            problems += [f"{page}: cell {i}: {o['ename']}: {o['evalue'][:200]}" for o in cell.get("outputs", [])
                         if o["output_type"] == "error"]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("chapter", FAMILY_CHAPTERS)
def test_papermill_runs_a_family_chapter_on_a_few_photos(small_book, chapter):
    _ran(small_book, chapter)
    table = pd.read_csv(small_book.results / f"{chapter}.csv")
    assert list(table.columns) == COLUMNS + PROVENANCE_COLUMNS
    given = small_book.parameters[chapter]
    assert set(table.manipulation) == set(given["manipulations"]) and set(table.layer) == set(given["layers"])
    assert {"transformer_pe", "local_linear", "procrustes", "cnn"} <= set(table.mapping)
    assert {"ssim", "st_lpips", "cos_reextract_median", "ssim_vs_inv_target"} <= set(table.metric)
    steps = table[table.metric == "steps"]
    assert len(steps) and (steps.value <= given["max_steps"]).all()


def test_papermill_runs_the_layers_chapter_with_its_control(small_book):
    _ran(small_book, "layers")
    table = pd.read_csv(small_book.results / "layers.csv")
    given = small_book.parameters["layers"]
    assert list(table.columns) == COLUMNS + PROVENANCE_COLUMNS
    assert list(dict.fromkeys(table.layer)) == given["layers"]
    assert set(table.manipulation) == set(given["manipulations"])
    assert set(table.backbone) == {"tf_efficientnet_lite0", "tf_efficientnet_lite0:random"}  # the control weights
    assert {f"linear_rank{k}" for k in given["ranks"]} <= set(table.mapping)
    assert {"wx_share", "bias_share", "erank_frac", "delta_erank_frac"} <= set(table.metric)


def test_papermill_runs_the_backbones_chapter_on_both_networks(small_book):
    from featmap.run.presets import defaults

    _ran(small_book, "backbones")
    table = pd.read_csv(small_book.results / "backbones.csv")
    assert list(table.columns) == COLUMNS + PROVENANCE_COLUMNS
    layers = table.groupby("backbone", sort=False)["layer"].unique().map(list).to_dict()
    expected = defaults("backbones")
    assert layers == {expected["backbone"]: expected["layers"], expected["second_backbone"]: expected["second_layers"]}
    assert set(table.manipulation) == set(small_book.parameters["backbones"]["manipulations"])
    cos = table[table.metric == "cos_mean"]
    assert {"identity", "linear", "transformer"} <= set(cos.mapping)
    assert cos.groupby("backbone").layer.nunique().eq(3).all()  # every map at the three depths of each network


def test_the_summary_reads_every_results_table(small_book):
    """The summary runs after every chapter, on all their tables, and states each claim's verdict."""
    _ran(small_book, "summary")
    writers = [Path(p).name for p in small_book.pages if small_book.is_notebook(p)
               and Path(p).name in small_book.parameters and small_book.parameters[Path(p).name]]
    assert {p.stem for p in small_book.results.glob("*.csv")} >= set(writers)
    text = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                     + re.sub(r"<[^>]+>", "", "".join(o.get("data", {}).get("text/html", "")))
                     for cell in small_book.notebook("summary")["cells"] for o in cell.get("outputs", []))
    for claim in ("1", "2", "3"):
        assert re.search(rf"claim {claim} \([^)]*\): (holds|does not hold|inconclusive|no verdict|described|"
                         rf"not measured)\b", text, re.I), \
            f"the summary states no verdict for claim {claim}"


MAX_LEGEND_ENTRIES = 8  # at most about eight series per panel
PAGE_WIDTH = 6.8  # inches: a figure shown at the page's width keeps its own size (plots.PAGE_WIDTH, and rounding)
SMALLEST_TEXT = 9  # points: at least the book's footnote size


def test_figures_have_few_legend_entries_and_legends_clear_of_titles(small_book):
    """Figures a person can read. The pages hold PNGs, so the figures are checked as the small book's kernels render
    them (conftest.FIGURE_PROBE): every figure the chapters draw, whichever function draws it, is at most as wide as
    the page (so it is never shrunk), holds no text under 9 points, and every legend has at most eight entries and
    covers no panel title or the figure's title."""
    figures = small_book.figures()
    drawn = {r["page"] for r in figures}
    with_images = {p for p in small_book.pages if small_book.is_notebook(p) and any(
        "image/png" in o.get("data", {}) for c in small_book.notebook(Path(p).name)["cells"]
        for o in c.get("outputs", []))}
    assert with_images and with_images <= drawn, f"the figure probe saw no figure on {sorted(with_images - drawn)}"
    problems = []
    for r in figures:
        where = f"{r['page']}: {r['source']!r}"
        if "error" in r:
            problems.append(f"{where}: legends could not be measured: {r['error']}")
        for legend in r.get("legends", []):
            if legend["entries"] > MAX_LEGEND_ENTRIES:
                problems.append(f"{where}: {legend['legend']} has {legend['entries']} entries (at most "
                                f"{MAX_LEGEND_ENTRIES}): {', '.join(legend['labels'])}")
            problems += [f"{where}: {legend['legend']} covers the title {title!r}" for title in legend["covers"]]
        if r.get("width", 0) > PAGE_WIDTH:
            problems.append(f"{where}: {r['width']:.1f} inches wide, more than the page's {PAGE_WIDTH}")
        if r.get("smallest_text") and r["smallest_text"][0] < SMALLEST_TEXT:
            problems.append(f"{where}: text of {r['smallest_text'][0]:g} points ({r['smallest_text'][1][:40]!r}), "
                            f"under {SMALLEST_TEXT}")
    assert not problems, f"{len(problems)} problem(s) in {len(figures)} figures:\n" + "\n".join(problems)


def test_a_failing_chapter_shows_the_failing_cell(tmp_path, photo_dir):
    with pytest.raises(pm.PapermillExecutionError, match="layers must be a non-empty list"):
        pm.execute_notebook(str(BOOK / "masking.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                            parameters={"images": str(photo_dir), "layers": "blocks.6"}, progress_bar=False)
    assert not (results_dir() / "masking.csv").exists()


def test_every_map_runs_in_its_spatial_modes_and_a_rerun_trains_nothing(photo_dir, monkeypatch):
    config = small_config(photo_dir, manipulations=["mirror_v", "noise_40"], max_steps=6, eval_every=3, patience=6,
                          plateau_steps=3,
                          spatial=["none", "applied", "learned"],
                          mappings=["identity", "linear", "local_linear", "mlp", "transformer_pe"])
    table = run_chapter(config).table
    modes = table[table.metric == "cos_mean"].groupby(["manipulation", "spatial"])["mapping"].apply(set).to_dict()
    assert modes == {("mirror_v", "none"): {"identity", "linear", "local_linear"},  # closed forms: the floor
                     ("mirror_v", "applied"): {"identity", "linear", "local_linear", "mlp", "transformer_pe"},
                     ("mirror_v", "learned"): {"transformer_pe"},
                     ("noise_40", "none"): {"identity", "linear", "local_linear", "mlp", "transformer_pe"}}
    steps = table[table.metric == "steps"]  # every trained fit says how it ended
    assert len(steps) == 5 and (steps.value <= 6).all()
    facts = table[table.metric.isin(["best_step", "stopped_early", "train_loss", "best_val_loss"])
                  & (table.mapping != "linear")]
    assert facts.groupby("metric").size().to_dict() == {"best_step": 5, "best_val_loss": 5, "stopped_early": 5,
                                                        "train_loss": 5}
    linear = table[(table.mapping == "linear") & table.metric.isin(["train_loss", "best_val_loss"])]
    assert len(linear) == 4  # the closed form's objective beside the trained maps, where they ran
    # paired gap rows: linear minus transformer_pe wherever both ran, equal to the difference of the means
    gaps = table[table.metric == "cos_mean_gap_transformer_pe"].set_index(["manipulation", "spatial"])["value"]
    cos = table[table.metric == "cos_mean"].pivot_table(index=["manipulation", "spatial"], columns="mapping",
                                                        values="value")
    both = cos[["linear", "transformer_pe"]].dropna()
    assert set(gaps.index) == set(both.index) | {("mirror_v", "learned")}
    assert sorted(both.index) == [("mirror_v", "applied"), ("noise_40", "none")]
    np.testing.assert_allclose(gaps.loc[both.index], both["linear"] - both["transformer_pe"], atol=2e-6)
    # the positive control: the linear map on the raw grid minus the global map learning the move there
    control = cos.loc[("mirror_v", "none"), "linear"] - cos.loc[("mirror_v", "learned"), "transformer_pe"]
    np.testing.assert_allclose(gaps.loc[("mirror_v", "learned")], control, atol=2e-6)

    import featmap.maps.learned

    def no_training(*a, **k):
        raise AssertionError("a rerun trained a map")

    monkeypatch.setattr(featmap.maps.learned, "train_map", no_training)
    again = run_chapter(config).table
    timed = (table.metric == "fit_seconds") & ~table.mapping.isin(["mlp", "transformer_pe"])  # closed forms refit
    pd.testing.assert_frame_equal(again[~timed], table[~timed])  # trained maps report their recorded fit time


def test_semantic_rows_match_the_full_models_own_predictions(photo_dir, tmp_path):
    import shutil

    from featmap.score.metrics import class_probabilities, jsd, top1_agree

    labelled_dir = tmp_path / "by_class"  # class folders named imagenet_<index> carry ImageNet labels
    for p in photo_dir.iterdir():
        (labelled_dir / f"imagenet_{p.stem.split('_')[-1]}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, labelled_dir / f"imagenet_{p.stem.split('_')[-1]}" / p.name)
    result = run_chapter(small_config(labelled_dir, manipulations=["grayscale"], mappings=["identity", "linear"]))
    table, store = result.table, result.store
    test = result.split.views("test", 1)
    grey = result.manipulations[0]
    p_orig = class_probabilities(store.backbone.logits(np.stack([store.image(v, None) for v in test])))
    p_grey = class_probabilities(store.backbone.logits(np.stack([store.image(v, grey) for v in test])))
    ident = table[(table.mapping == "identity")].set_index("metric").value
    # float16 features move the probabilities a little; the identity map's rows are the model's own
    assert ident["jsd"] == pytest.approx(jsd(p_orig, p_grey).mean().item(), abs=2e-3)
    assert ident["top1_agree"] == pytest.approx(top1_agree(p_orig, p_grey).mean().item())
    assert all(v.photo.imagenet_index is not None for v in test)
    accuracy = table[table.metric == "top1_acc"].set_index("mapping").value
    assert set(accuracy.index) == {"identity", "linear", "target"}
    labels = torch.tensor([v.photo.imagenet_index for v in test])
    assert accuracy["identity"] == pytest.approx((p_orig.argmax(1) == labels).double().mean().item())
    assert accuracy["target"] == pytest.approx((p_grey.argmax(1) == labels).double().mean().item())
    unlabelled = run_chapter(small_config(photo_dir, manipulations=["grayscale"], mappings=["identity"])).table
    assert "top1_acc" not in set(unlabelled.metric) and "top1_agree" in set(unlabelled.metric)


def test_image_space_scores_each_photo_against_its_own_map(photo_dir):
    """With fewer image-scored photos than test photos (a seeded subset that leaves out the first test photo), each
    reconstruction of a true map is compared with the photo that map belongs to: an oracle inverter that returns
    the photo a map came from scores the target perfectly, and the figures pair each photo with its own images."""
    from featmap.data.images import to_uint8_images
    from featmap.run.cells import image_subset
    from featmap.run.prepare import prepare
    from featmap.score.inversion import CallableInverter

    for seed in range(20):  # a seed whose subset is not simply the first test photo
        config = small_config(photo_dir, manipulations=["grayscale"], mappings=["identity"], image_layers="last",
                              image_mappings=["identity"], image_photos=1, seed=seed)
        _, split, store, manipulations = prepare(config)
        test = split.views("test", 1)
        if image_subset(test, 1, seed)[0].key != test[0].key:
            break
    else:
        pytest.fail("no seed in 0..19 draws another photo than the first: the test photos are too few")
    manip = manipulations[0]
    store.ensure(test, [None, manip])
    maps = store.load(test, manip, "blocks.6").float()
    photos = torch.from_numpy(to_uint8_images(np.stack([store.image(v, manip) for v in test]), 32))
    originals = torch.from_numpy(to_uint8_images(np.stack([store.image(v, None) for v in test]), 32))

    def oracle(feats):  # the photo whose true manipulated map is nearest
        return photos[torch.cdist(feats.flatten(1), maps.flatten(1)).argmin(1)].permute(0, 3, 1, 2).float() / 255

    result = run_chapter(config, inverters={"blocks.6": CallableInverter(oracle, "blocks.6", 32)})
    table = result.table
    target = table[(table.mapping == "target") & (table.metric == "ssim")]
    assert len(target) == 1 and target.value.iloc[0] == pytest.approx(1.0) and target.n.iloc[0] == 1
    panels = result.reconstructions["grayscale", "blocks.6"]
    assert np.array_equal(panels["target"], panels["manipulated"])
    chosen = next(i for i, v in enumerate(test) if v.key == image_subset(test, 1, seed)[0].key)
    assert np.array_equal(panels["original"][0], originals[chosen].numpy())


def test_image_space_rows_with_a_planted_inverter(photo_dir):
    """An inverter that paints every map the same grey: every reconstruction equals the target's (SSIM 1,
    ST-LPIPS 0 against it), and the scores against the manipulated image are those of a grey image."""
    from featmap.data.images import to_uint8_images
    from featmap.score.images import ssim
    from featmap.score.inversion import CallableInverter

    grey = CallableInverter(lambda f: torch.full((len(f), 3, 32, 32), 0.5), layer="blocks.6", image_size=32)
    config = small_config(photo_dir, image_layers="last", image_mappings=["identity", "linear"], image_photos=3,
                          mappings=["identity", "linear"])
    result = run_chapter(config, inverters={"blocks.6": grey})
    table = result.table
    vs = table[table.metric == "ssim_vs_inv_target"]
    assert set(vs.mapping) == {"identity", "linear"} and np.allclose(vs.value, 1.0)
    assert np.allclose(table[table.metric == "st_lpips_vs_inv_target"].value, 0.0, atol=1e-6)
    # scored on the comparable mode only: rotation after the permutation, grayscale as it is
    assert set(zip(vs.manipulation, vs.spatial)) == {("rotation_90", "applied"), ("grayscale", "none")}
    test = result.split.views("test", 1)[:3]
    manipulated = np.stack([result.store.image(v, result.manipulations[1]) for v in test])
    assert len(test) == 2  # fewer test photos than image_photos: all of them are scored
    expected = ssim(np.full((2, 32, 32, 3), 128, np.uint8), to_uint8_images(manipulated, 32)).mean()
    target = table[(table.mapping == "target") & (table.metric == "ssim") & (table.manipulation == "grayscale")]
    assert target.value.iloc[0] == pytest.approx(expected) and (target.n == 2).all()
    panels = result.reconstructions["grayscale", "blocks.6"]
    assert list(panels) == ["original", "manipulated", "target", "identity", "linear"]
    assert all(p.shape == (2, 32, 32, 3) for p in panels.values())
    with pytest.raises(ValueError, match="inverters given for \\['blocks.2'\\]"):
        run_chapter(config, inverters={"blocks.2": grey})
