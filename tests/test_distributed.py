"""Data-parallel heavy steps: two gloo processes on the CPU (spawned here) against one process."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import featmap.maps.learned as learned
from featmap.__main__ import build_config
from featmap.core.distributed import Context, init, shutdown
from featmap.maps.base import MapOptions, get_mapping
from featmap.maps.data import PairData, ShardedPairData
from featmap.maps.stats import LinearStats
from featmap.run.chapter import map_options, run_chapter
from featmap.run.distributed import prepare_chapter
from featmap.run.prepare import prepare
from featmap.run.presets import defaults as chapter_defaults
from featmap.train.loop import TrainConfig

BIN = Path(sys.executable).parent
CLOSED_FORM = ["additive", "linear", "local_linear", "procrustes"]
# A chapter-shaped run small enough for two processes on two cores: 8 photos -> 14 views x 3 images.
PARAMS = [["layers", "[blocks.4]"], ["image_size", "96"], ["manipulations", "[mask_big_square_center, grayscale]"],
          ["mappings", "[identity, " + ", ".join(CLOSED_FORM) + ", mlp]"], ["map_size", "tiny"],
          ["max_epochs", "3"], ["bootstrap", "20"], ["threads", "1"], ["device", "cpu"],
          ["image_layers", "none"]]  # the chapter's inverter is trained by the chapter, not by prepare
# A rank killed mid-extraction: its Nth cache write dies after half a file, by SIGKILL (no cleanup runs).
DIES_MID_WRITE = """
import os, signal, sys
import featmap.core.io as cache
import featmap.features.store
real, calls = cache.atomic_write, [0]
def torn(f):
    f.write(b"\\x93NUMPY half a file")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
def dying(path, write):
    calls[0] += 1
    return real(path, torn if calls[0] == int(os.environ["DIE_AT_WRITE"]) else write)
for module in [m for n, m in list(sys.modules.items()) if n.startswith("featmap.")]:
    if getattr(module, "atomic_write", None) is real:  # every module that writes through the atomic helper
        module.atomic_write = dying
from featmap.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def cli_params(photo_dir, cache) -> list[list[str]]:
    return PARAMS + [["images", str(photo_dir)], ["cache_dir", str(cache)]]


def cli_args(photo_dir, cache, summary) -> list[str]:
    args = ["prepare", "--chapter", "masking", "--summary", str(summary)]
    for name, value in cli_params(photo_dir, cache):
        args += ["-p", name, value]
    return args


def torchrun(nproc: int, args: list[str]) -> dict:
    """Returns the summary of ``python -m featmap`` run under torchrun with ``nproc`` CPU processes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "-m", "featmap",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(args[args.index("--summary") + 1]).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy_files(cache: Path) -> dict[str, Path]:
    return {p.stem: p for p in cache.rglob("*.npy") if "phash" not in p.relative_to(cache).parts}  # features


@pytest.fixture(scope="module")
def run2(photo_dir, tmp_path_factory):
    """The two-process run: its cache, closed-form fits and summary, and the config a chapter would build."""
    root = tmp_path_factory.mktemp("two_ranks")
    args = cli_args(photo_dir, root / "cache", root / "summary.json") + ["--fits", str(root / "fits.pt")]
    summary = torchrun(2, args)
    config = build_config("masking", [], [], cli_params(photo_dir, root / "cache"))
    return {"cache": root / "cache", "summary": summary, "fits": torch.load(root / "fits.pt"), "config": config}


@pytest.fixture(scope="module")
def prepared(run2):
    """A single process's photos, split, feature store (on the two-process run's cache) and manipulations."""
    return prepare(run2["config"])


@pytest.fixture(scope="module")
def expected_keys(run2, prepared):
    """The content key of every (view, manipulation, layer) the chapter needs."""
    images, split, store, manips = prepared
    views = sum((split.views(part, run2["config"].train_views) for part in ("train", "val", "test")), [])
    return {store.key(v, m, layer) for v in views for m in [None] + manips for layer in store.backbone.layers}


def test_every_image_is_extracted_exactly_once_across_ranks(run2, expected_keys):
    summary = run2["summary"]
    per_rank = summary["per_rank"]
    assert summary["world_size"] == 2 and [r["rank"] for r in per_rank] == [0, 1]
    assert set(npy_files(run2["cache"])) == expected_keys
    assert sum(r["cache_writes"] for r in per_rank) == len(expected_keys)  # no key written twice
    assert sum(r["images"] for r in per_rank) == summary["views"] * (summary["manipulations"] + 1)
    assert abs(per_rank[0]["views"] - per_rank[1]["views"]) <= 1 and all(r["images"] > 0 for r in per_rank)


def test_the_distributed_closed_form_fits_equal_one_process(run2, prepared):
    config = run2["config"]
    _, split, store, manips = prepared
    writes = store.cache.writes
    parts = {"train": split.views("train", config.train_views), "val": split.views("val", config.train_views)}
    assert len(run2["fits"]) == len(manips) * len(CLOSED_FORM)
    for manip in manips:
        data = PairData(store, parts, manip, "blocks.4", "none", config.batch_size)
        for name in CLOSED_FORM:
            single = get_mapping(name, map_options(config)).fit(data)
            fit = run2["fits"][f"{manip.name}/blocks.4/none/{name}"]
            for field, value in fit.items():
                if isinstance(value, torch.Tensor):
                    ref = getattr(single, field)
                    rel = float((value - ref).norm() / ref.norm())
                    assert rel <= 1e-6, (manip.name, name, field, rel)
                else:
                    assert value == pytest.approx(single.extra_metrics()[field], rel=1e-6), (name, field)
    assert store.cache.writes == writes  # the single-process fits read the distributed run's cache


def test_a_chapter_consumes_the_distributed_caches(run2, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("the chapter trained a map the distributed run had trained")

    monkeypatch.setattr(learned, "train_map", no_training)
    from_two = run_chapter(run2["config"], write=False)
    assert from_two.extracted == 0
    monkeypatch.undo()
    single = run_chapter(build_config("masking", [], [], cli_params(run2["config"].images, tmp_path / "c")),
                         write=False)
    assert single.extracted == len(npy_files(run2["cache"]))
    # Same rows; closed-form numbers agree up to the float16 rounding of features extracted in other batches.
    rows = ["manipulation", "layer", "spatial", "mapping", "metric"]
    a, b = (r.table.set_index(rows).sort_index() for r in (from_two, single))
    assert a.index.equals(b.index)
    closed = a.index.get_level_values("mapping").isin(["identity"] + CLOSED_FORM) \
        & a.index.get_level_values("metric").isin(["cos_mean", "cos_median", "rel_err", "top1_agree", "jsd"])
    np.testing.assert_allclose(a.value[closed], b.value[closed], rtol=1e-3, atol=1e-4)


def test_a_killed_rank_leaves_no_entry_a_rerun_trusts(run2, photo_dir, tmp_path, expected_keys):
    cache = tmp_path / "cache"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    args = cli_args(photo_dir, cache, tmp_path / "killed.json") + ["--timeout-minutes", "0.5"]
    survivor = subprocess.Popen([sys.executable, "-m", "featmap", *args], env=env | {"RANK": "0", "LOCAL_RANK": "0"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.run([sys.executable, "-c", DIES_MID_WRITE, *args], capture_output=True, text=True,
                            env=env | {"RANK": "1", "LOCAL_RANK": "1", "DIE_AT_WRITE": "7"}, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    try:
        survivor.wait(timeout=90)  # it fails at the first collective after its peer is gone
    finally:
        survivor.kill()
    assert survivor.returncode != 0

    entries = npy_files(cache)
    assert 0 < len(entries) < len(expected_keys) and set(entries) <= expected_keys
    assert list(cache.rglob(".*.tmp")), "the torn write should have left its temporary file"
    clean = npy_files(run2["cache"])
    before = {key: path.read_bytes() for key, path in entries.items()}
    for key, path in entries.items():  # every entry a reader sees is complete and the very features of a clean run
        np.testing.assert_array_equal(np.load(path), np.load(clean[key]))

    config = build_config("masking", [], [], cli_params(photo_dir, cache))
    rerun = prepare_chapter(config, Context())  # a rerun on any number of processes
    assert rerun["per_rank"][0]["cache_writes"] == len(expected_keys) - len(entries)
    after = npy_files(cache)
    assert set(after) == expected_keys
    assert all(after[key].read_bytes() == blob for key, blob in before.items())  # survivors were not redone
    for key, path in after.items():  # the redone ones: other batches, so equal up to float16 rounding
        new, ref = np.load(path).astype(np.float32), np.load(clean[key]).astype(np.float32)
        np.testing.assert_allclose(new, ref, rtol=0, atol=1e-3 * np.abs(ref).max())


def planted(seed: int, n: int = 320, c: int = 8, side: int = 4):
    """Returns x and y = W x + b for a seeded random affine W, b (shared over positions)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, c, generator=g) / c ** 0.5, torch.randn(c, generator=g) * 0.5
    x = torch.randn(n, c, side, side, generator=g)
    return x, torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1)


class Pairs:
    """A FitData over in-memory pairs: the first 3/4 train, the rest validation."""

    key = "planted"

    def __init__(self, x, y):
        cut = len(x) * 3 // 4
        self.parts = {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:])}

    def tensors(self, part):
        return self.parts[part]


def ddp_options(cache: Path) -> MapOptions:
    # "tiny" has no dropout: with it, each rank would draw other masks than one process does.
    train = TrainConfig(lr=1e-2, batch_size=48, max_steps=40, eval_every=5, patience=40, plateau_steps=40, seed=0)
    return MapOptions(size="tiny", cache_dir=str(cache), progress=False, device="cpu", train=train, start="identity")


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    context = init("cpu")
    x, y = planted(0)
    # Each rank sums the statistics of its share; the all-reduced sums are every position's.
    local = LinearStats(8, 8).update(context.shard(x), context.shard(y))
    torch.save(context.all_reduce_stats(local).__dict__, Path(out) / f"stats{rank}.pt")
    get_mapping("mlp", ddp_options(Path(out))).fit(Pairs(x, y), context=context)
    shutdown(context)


def test_ddp_training_and_stats_match_one_process(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = planted(0)
    whole = LinearStats(8, 8).update(x, y)
    for rank in (0, 1):
        summed = torch.load(tmp_path / f"stats{rank}.pt")
        assert summed["n"] == whole.n and summed["yty"] == pytest.approx(whole.yty, rel=1e-12)
        assert torch.allclose(summed["xtx"], whole.xtx, rtol=1e-12) and torch.allclose(summed["xty"], whole.xty,
                                                                                        rtol=1e-12)
    maps = list((tmp_path / "maps").glob("*.pt"))
    assert len(maps) == 1 and not list((tmp_path / "maps").glob("*.partial.pt"))  # rank 0 wrote one map
    ddp = torch.load(maps[0])
    single = get_mapping("mlp", ddp_options(tmp_path / "single")).fit(Pairs(x, y))
    assert ddp["history"]["steps"] == single.history["steps"] == 40
    # Same seeded batches, gradient of the whole batch: equal up to the order of float32 sums (measured: 3e-7
    # of the largest weight, 1e-6 relative on validation losses; asserted with ten times that room).
    np.testing.assert_allclose([r["val_loss"] for r in ddp["history"]["history"]],
                               [r["val_loss"] for r in single.history["history"]], rtol=1e-5)
    for name, value in single.model.state_dict().items():
        np.testing.assert_allclose(ddp["model"][name], value, rtol=0, atol=1e-5 * float(value.abs().max()) + 1e-8,
                                   err_msg=name)


def test_a_context_shards_disjointly_and_covers_everything():
    items = list(range(11))
    shares = [Context(rank=r, world_size=3, backend="gloo").shard(items) for r in range(3)]
    assert sorted(sum(shares, [])) == items and max(map(len, shares)) - min(map(len, shares)) <= 1
    single = Context()
    assert single.shard(items) == items and single.is_main and not single.distributed
    stats = LinearStats(2, 2)
    assert single.all_reduce_stats(stats) is stats and single.broadcast("x") == "x" and single.gather(1) == [1]
    with pytest.raises(ValueError, match="rank must be in"):
        Context(rank=2, world_size=2, backend="gloo")
    with pytest.raises(ValueError, match="needs a backend"):
        Context(rank=0, world_size=2)


def test_single_process_sharded_data_is_pair_data(prepared):
    _, split, store, manips = prepared
    args = (store, {"train": split.views("train", 1), "val": split.views("val", 1)}, manips[0], "blocks.4", "none", 4)
    plain, sharded = PairData(*args), ShardedPairData(Context(), *args)
    assert plain.key == sharded.key
    for part in ("train", "val"):
        assert torch.equal(plain.stats(part).xtx, sharded.stats(part).xtx)
        assert torch.equal(plain.position_stats(part).xty, sharded.position_stats(part).xty)


def test_the_command_line_builds_the_chapters_config(photo_dir, tmp_path):
    defaults = chapter_defaults("masking")  # the one definition the notebook's cell is generated from
    assert defaults["manipulations"] and "layers" in defaults
    config = build_config("masking", [], ["layers: [blocks.6]"], [["max_images", "5"]])
    assert config.layers == ["blocks.6"] and config.max_images == 5
    assert config.manipulations == defaults["manipulations"]
    params = tmp_path / "p.yaml"
    params.write_text("seed: 3\nmax_images: 4\n")
    assert build_config("masking", [str(params)], [], [["max_images", "6"]]).max_images == 6  # -p wins
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        build_config("masking", [], [], [["colour", "red"]])
    with pytest.raises(ValueError, match="unknown parameter 'layerz'.*did you mean 'layers'"):
        build_config("masking", [], [], [["layerz", "[blocks.4]"]])
    with pytest.raises(ValueError, match="unknown chapter 'no_such_chapter'; chapters with parameters: geometric"):
        build_config("no_such_chapter", [], [], [])
