"""``make book``'s runner: every chapter through papermill, in order, with its progress streamed to the terminal
(never into the page) and its time printed; the rendered pages hold results only. ``--json PATH`` also writes the
per-chapter seconds as JSON (rewritten after every chapter, so a failed run keeps the chapters that finished)."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from featmap.core.progress import PROGRESS_ENV


class _Follow(threading.Thread):
    """Prints the newest progress line of a file every few seconds (tqdm rewrites its line with carriage returns)."""

    def __init__(self, path: Path, label: str, every: float = 5.0):
        super().__init__(daemon=True)
        self.path, self.label, self.every = path, label, every
        self.done = threading.Event()

    def run(self) -> None:
        offset, last = 0, ""
        while not self.done.wait(self.every):
            last, offset = self._show(offset, last)
        self._show(offset, last)

    def _show(self, offset: int, last: str) -> tuple[str, int]:
        if not self.path.is_file():
            return last, offset
        with self.path.open("rb") as f:
            f.seek(offset)
            chunk = f.read().decode("utf-8", "replace")
            offset = f.tell()
        parts = [p.strip() for p in chunk.replace("\r", "\n").split("\n") if p.strip()]
        if parts and parts[-1] != last:
            last = parts[-1]
            print(f"  [{self.label}] {last}", flush=True)
        return last, offset


def write_timings(path: Path, seconds: dict[str, float], chapters: list[str], failed: str | None = None) -> None:
    """Writes the book run's timings to ``path`` (atomically): seconds per chapter finished, their total, the
    chapters asked for, whether every one finished, and the one that failed (None)."""
    from featmap.core.io import atomic_write

    data = {"chapters": {c: seconds[c] for c in chapters if c in seconds}, "total_seconds": sum(seconds.values()),
            "asked": chapters, "complete": failed is None and all(c in seconds for c in chapters), "failed": failed,
            "cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_end": os.getloadavg()}
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def fold_injected(path: Path) -> None:
    """Folds the cell papermill injects with the given parameters (tag ``injected-parameters``): a page shows its
    results first, the parameters one click away (jupyter-book's ``hide-cell``)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
            changed = True
    if changed:
        nbformat.write(nb, path)


def run_book(chapters: list[str], book: Path, stage: Path, timings: Path | None = None) -> dict[str, float]:
    """Runs ``book/<chapter>.ipynb`` for every chapter into ``stage/book/``; returns the seconds each took, and
    writes them to ``timings`` (JSON, see ``write_timings``) after every chapter when given.

    A failing chapter stops the run with its error (papermill writes the failed notebook, error included).
    """
    import papermill as pm

    (stage / "book").mkdir(parents=True, exist_ok=True)
    progress = (stage / "progress").resolve()  # absolute: the kernels run in stage/book
    progress.mkdir(exist_ok=True)
    seconds = {}
    for chapter in chapters:
        log = progress / f"{chapter}.log"
        log.unlink(missing_ok=True)
        print(f"book: {chapter} ...", flush=True)
        follow = _Follow(log, chapter)
        follow.start()
        os.environ[PROGRESS_ENV] = str(log)
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(book / f"{chapter}.ipynb"), str(stage / "book" / f"{chapter}.ipynb"),
                                cwd=str(stage / "book"), progress_bar=False, log_output=False)
            fold_injected(stage / "book" / f"{chapter}.ipynb")
        except BaseException:
            if timings is not None:
                write_timings(timings, seconds, chapters, failed=chapter)
            raise
        finally:
            follow.done.set()
            follow.join()
            os.environ.pop(PROGRESS_ENV, None)
        seconds[chapter] = time.perf_counter() - start
        if timings is not None:
            write_timings(timings, seconds, chapters)
        print(f"book: {chapter} done in {seconds[chapter]:.0f} s", flush=True)
    print("book: " + ", ".join(f"{c} {s:.0f} s" for c, s in seconds.items())
          + f"; total {sum(seconds.values()):.0f} s", flush=True)
    return seconds


def main(argv: list[str]) -> int:
    """``python -m featmap book STAGE CHAPTER ... [--json PATH]``: runs the chapters into STAGE (see
    ``run_book``); ``--json PATH`` writes the per-chapter seconds there."""
    from featmap.core.io import REPO_ROOT

    argv, timings = list(argv), None
    if "--json" in argv:
        at = argv.index("--json")
        if at + 1 >= len(argv):
            print("--json needs a path", file=sys.stderr)
            return 2
        timings = Path(argv.pop(at + 1))
        argv.pop(at)
    if len(argv) < 2 or any(a.startswith("-") for a in argv):
        print("usage: python -m featmap book STAGE CHAPTER [CHAPTER ...] [--json PATH]", file=sys.stderr)
        return 2
    run_book(argv[1:], REPO_ROOT / "book", Path(argv[0]), timings)
    return 0
