"""Shared fixtures: every test writes its cache and results under a temporary folder, offline.

``small_book`` is the one small book of a test run: every notebook in _toc.yml run by papermill on tiny parameters
and rendered by jupyter-book, once per session; the browser test and the papermill tests both read it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from featmap.core.memory import keep_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than retry a hub that is not there
# A test run is an entry point as `python -m featmap` is: the arrays its tests free are reused, not faulted in again
keep_freed_memory()

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEATMAP_RESULTS", str(tmp_path / "results"))


@pytest.fixture(scope="session")
def foolbox_dir() -> Path:
    from featmap.data.images import foolbox_photos

    return foolbox_photos()[0].path.parent


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, foolbox_dir) -> Path:
    """A flat folder of 8 real labelled photos (copied from the foolbox wheel)."""
    out = tmp_path_factory.mktemp("photos")
    for p in sorted(foolbox_dir.glob("imagenet_*.jpg"))[:8]:
        shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="session")
def lite0():
    from featmap.features.backbone import Backbone

    return Backbone("tf_efficientnet_lite0", ["blocks.4", "blocks.6"])


@pytest.fixture(scope="module")
def module_one_thread():
    """One torch thread for a whole test module (a module of many small torch tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def every_epoch_checkpoints(monkeypatch):
    """Training checkpoints after every epoch (the default waits 30 s between them), for the tests that interrupt a
    run at a checkpoint."""
    import featmap.train.loop as loop

    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two threads make small batches many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# The small book

# Tiny parameters for every chapter; each notebook gets only the ones it takes (featmap.run.presets.defaults).
# One thread: on a shared 2-core machine torch's default of two is many times slower. Every map runs (the papermill
# tests check each one reaches the table), trained maps for at most 8 steps, image space on 2 photos through a 1-epoch
# 32-pixel inverter that learns from one edit (one inverter serves every chapter: the cache is shared).
TINY = {"layers": ["blocks.6"], "max_images": None, "image_size": 128, "train_views": 1, "bootstrap": 50,
        "max_steps": 8, "eval_every": 4, "patience": 8, "plateau_steps": 4, "threads": 1, "image_photos": 2,
        "inverter_size": 32, "inverter_epochs": 1,
        "inverter_manipulations": ["grayscale"]}
PER_CHAPTER = {
    "geometric": {"manipulations": ["mirror_h", "hue_shift_60"]},
    "masking": {"manipulations": ["mask_big_square_center"]},
    # GrabCut finds no object in some of the 8 test photos: 24 default photos give every split part an object
    "semantic": {"manipulations": ["object_recolor", "object_paste"], "images": "default", "max_images": 24},
    "layers": {"layers": ["blocks.4", "blocks.6"], "manipulations": ["mirror_h", "mask_big_square_center"],
               "ranks": [1, 4, 16]},
    # three depths per backbone (the depth trend needs three); DINOv2 extracts about 5 photos/s: 8 photos, 2 edits
    # (local_linear's per-position ridge search costs about 100 s per case on DINOv2's 16x16x384 maps: left out)
    "backbones": {"manipulations": ["mirror_h", "grayscale"], "layers": "chapter default",
                  "mappings": ["identity", "additive", "linear", "mlp", "transformer"]},
}
# Run at the start of every kernel of the small book (an IPython startup file): as each figure is rendered into
# the page, records its legends (visible entries, and the panel or figure titles each legend box covers) to
# $SMALL_BOOK_FIGURES, one JSON line per figure. Whatever function draws it, every figure of the book is checked.
FIGURE_PROBE = r"""
import json as _json
import os as _os


def _small_book_probe():
    from IPython import get_ipython
    from matplotlib.backend_bases import FigureCanvasBase

    render = FigureCanvasBase.print_figure

    def legends(fig):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        titles = [t for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title)]
        titles += [fig._suptitle] if fig._suptitle is not None else []
        titles = [t for t in titles if t.get_visible() and t.get_text().strip()]
        found = [(f"panel {i} legend", ax.get_legend()) for i, ax in enumerate(fig.axes) if ax.get_legend()]
        found += [(f"figure legend {i}", legend) for i, legend in enumerate(fig.legends)]
        out = []
        for name, legend in found:
            if legend.get_visible():
                box = legend.get_window_extent(renderer)
                out.append({"legend": name,
                            "entries": sum(h is not None and h.get_visible() for h in legend.legend_handles),
                            "labels": [t.get_text() for t in legend.get_texts()][:40],
                            "covers": [t.get_text() for t in titles if box.overlaps(t.get_window_extent(renderer))]})
        return out

    def print_figure(self, *args, **kwargs):
        shell = get_ipython()
        cells = shell.history_manager.input_hist_raw if shell else [""]
        record = {"page": "book/" + _os.environ.get("FEATMAP_BOOK_CHAPTER", "?"), "cell": len(cells),  # the cell now
                  "source": (cells[-1].strip().splitlines() or [""])[0][:100],
                  "figure": id(self.figure), "axes": len(self.figure.axes)}
        try:
            record["legends"] = legends(self.figure)
            record["width"], record["height"] = [float(v) for v in self.figure.get_size_inches()]
            sizes = [(t.get_fontsize(), t.get_text()) for t in self.figure.findobj(
                lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")) if t.get_visible()
                and t.get_text().strip()]
            record["smallest_text"] = min(sizes) if sizes else None
        except Exception as error:  # the probe must never break a figure: say what went wrong instead
            record["error"] = repr(error)
        with open(_os.environ["SMALL_BOOK_FIGURES"], "a") as f:
            f.write(_json.dumps(record) + "\n")
        return render(self, *args, **kwargs)

    FigureCanvasBase.print_figure = print_figure


if _os.environ.get("SMALL_BOOK_FIGURES"):
    _small_book_probe()
"""
MATH_PROBE = "# Math probe\n\nInline $\\|W - I\\|_F^2$ and display:\n\n$$\ny = W x + b\n$$\n"


def toc_files(toc: dict) -> list[str]:
    """Returns every ``file`` in a jupyter-book _toc.yml, in reading order (root first)."""
    out = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                out.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    walk(child)

    walk(toc)
    return out


def chapter_parameters(chapter: str, photos: Path) -> dict:
    """Returns the tiny parameters ``chapter`` takes (none for a notebook without a preset)."""
    from featmap.run.presets import PRESETS, defaults

    if chapter not in PRESETS:
        return {}
    wanted = {**TINY, "images": str(photos), **PER_CHAPTER.get(chapter, {})}
    takes = defaults(chapter)
    return {k: v for k, v in wanted.items() if k in takes and v != "chapter default"}


@dataclass
class SmallBook:
    root: Path
    stage: Path                      # the staged book: executed notebooks under stage/book
    html: Path                       # jupyter-book's html output
    pages: list[str]                 # every page (toc files and the math probe), reading order
    results: Path                    # the run's results tables (FEATMAP_RESULTS of every chapter)
    parameters: dict[str, dict]      # chapter -> the parameters papermill passed
    seconds: dict[str, float] = field(default_factory=dict)   # chapter (and "jupyter-book build") -> seconds
    failed: dict[str, str] = field(default_factory=dict)      # chapter -> papermill's error
    build_log: str = ""
    build_ok: bool = False

    @property
    def figures_log(self) -> Path:
        """The figure probe's records (FIGURE_PROBE), one JSON line per figure rendered into a page."""
        return self.root / "figures.jsonl"

    def figures(self) -> list[dict]:
        """Returns one record per figure the book's notebooks rendered (the last rendering of each)."""
        if not self.figures_log.is_file():
            return []
        records = [json.loads(line) for line in self.figures_log.read_text().splitlines() if line.strip()]
        return list({(r["page"], r["cell"], r["figure"]): r for r in records}.values())

    def notebook(self, chapter: str) -> dict:
        """Returns the executed notebook of ``chapter`` (JSON)."""
        return json.loads((self.stage / "book" / f"{chapter}.ipynb").read_text())

    def is_notebook(self, page: str) -> bool:
        return (self.stage / f"{page}.ipynb").is_file()


SMALL_BOOKS: list[SmallBook] = []  # every small book built in this test run: one (the tests share it)


@pytest.fixture(scope="session")
def small_book(tmp_path_factory, photo_dir) -> SmallBook:
    """Runs every notebook of _toc.yml on tiny parameters (with ``make book``'s runner, two chapters at once, into a
    staging copy with its own cache and results) and renders it with jupyter-book, once per test run. A chapter that
    fails is recorded (``failed``) and the others still run, so one broken chapter does not hide the rest's state."""
    import yaml

    from featmap.run.book import run_book

    start = time.monotonic()
    root = tmp_path_factory.mktemp("small_book")
    stage = root / "stage"
    (stage / "book").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", stage)
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = toc_files(toc)
    for page in files:  # markdown pages as they are
        if not (REPO / f"{page}.ipynb").is_file() and (REPO / f"{page}.md").is_file():
            shutil.copy(REPO / f"{page}.md", stage / f"{page}.md")
    shutil.copytree(REPO / "book" / "_ext", stage / "book" / "_ext")
    book = SmallBook(root=root, stage=stage, html=root / "_build" / "html", pages=files + ["book/math_probe"],
                     results=root / "results", parameters={})
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-figure-probe.py").write_text(FIGURE_PROBE)
    notebooks = [Path(page).name for page in files if (REPO / f"{page}.ipynb").is_file()]
    book.parameters = {chapter: chapter_parameters(chapter, photo_dir) for chapter in notebooks}
    # make book's own runner, two chapters at once; the kernels get these: nothing touches the real caches
    env = {"FEATMAP_CACHE": str(root / "cache"), "FEATMAP_RESULTS": str(book.results),
           "IPYTHONDIR": str(root / "ipython"),  # a fresh IPython profile whose startup runs the probe
           "SMALL_BOOK_FIGURES": str(book.figures_log)}
    run = run_book(notebooks, REPO / "book", stage, jobs=2, parameters=book.parameters, env=env, keep_going=True)
    book.seconds.update(run.seconds)
    book.seconds["chapters, wall"] = run.wall
    book.failed.update(run.failed)
    (stage / "book" / "math_probe.md").write_text(MATH_PROBE)  # the book may have no math of its own
    toc.setdefault("chapters", []).append({"file": "book/math_probe"})
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"  # the venv's, beside this Python
    began = time.monotonic()
    build = subprocess.run([str(jupyter_book), "build", str(stage), "--path-output", str(root), "--warningiserror",
                            "--keep-going"], capture_output=True, text=True, timeout=900)
    book.seconds["jupyter-book build"] = time.monotonic() - began
    book.build_ok, book.build_log = build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    book.seconds["total"] = time.monotonic() - start
    SMALL_BOOKS.append(book)
    return book


def pytest_terminal_summary(terminalreporter):
    """Says how long the small book took, per chapter, when this run built it."""
    for book in SMALL_BOOKS:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in book.seconds.items() if k != "total")
        failed = f"; failed: {', '.join(book.failed)}" if book.failed else ""
        terminalreporter.write_line(f"small book: {book.seconds.get('total', 0):.0f} s ({parts}){failed}")
