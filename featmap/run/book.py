"""``make book``'s runner: every chapter through papermill, in order, with its progress streamed to the terminal
(never into the page) and its time printed; the rendered pages hold results only."""
from __future__ import annotations

import os
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


def run_book(chapters: list[str], book: Path, stage: Path) -> dict[str, float]:
    """Runs ``book/<chapter>.ipynb`` for every chapter into ``stage/book/``; returns the seconds each took.

    A failing chapter stops the run with its error (papermill writes the failed notebook, error included).
    """
    import papermill as pm

    (stage / "book").mkdir(parents=True, exist_ok=True)
    progress = stage / "progress"
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
        finally:
            follow.done.set()
            follow.join()
            os.environ.pop(PROGRESS_ENV, None)
        seconds[chapter] = time.perf_counter() - start
        print(f"book: {chapter} done in {seconds[chapter]:.0f} s", flush=True)
    print("book: " + ", ".join(f"{c} {s:.0f} s" for c, s in seconds.items())
          + f"; total {sum(seconds.values()):.0f} s", flush=True)
    return seconds


def main(argv: list[str]) -> int:
    """``python -m featmap book STAGE CHAPTER ...``: runs the chapters into STAGE (see ``run_book``)."""
    from featmap.core.io import REPO_ROOT

    if len(argv) < 2:
        print("usage: python -m featmap book STAGE CHAPTER [CHAPTER ...]", file=sys.stderr)
        return 2
    run_book(argv[1:], REPO_ROOT / "book", Path(argv[0]))
    return 0
