"""``make book``'s runner: every chapter through papermill (independent chapters side by side, one process each,
an explicit thread policy, featmap's allocator settings), with its progress streamed to the terminal (never into the
page) and its time printed; the rendered pages hold results only. ``--json PATH`` also writes the
per-chapter seconds as JSON (rewritten after every chapter, so a failed run keeps the chapters that finished)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from featmap.core.memory import allocator_env
from featmap.core.progress import PROGRESS_ENV


class _Follow(threading.Thread):
    """Prints the newest progress line of a file every few seconds (tqdm rewrites its line with carriage returns),
    and every warning line written since (``warning:``), which a newer progress line must not hide."""

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
        for line in parts[:-1]:
            if line.lower().startswith("warning"):
                print(f"  [{self.label}] {line}", flush=True)
        if parts and parts[-1] != last:
            last = parts[-1]
            print(f"  [{self.label}] {last}", flush=True)
        return last, offset


def write_timings(path: Path, seconds: dict[str, float], chapters: list[str], failed: str | None = None,
                  wall: float | None = None, jobs: int = 1, threads: int | None = None) -> None:
    """Writes the book run's timings to ``path`` (atomically): seconds per chapter finished, their sum, the wall
    time so far (chapters overlap when ``jobs`` > 1), the chapters asked for, whether every one finished, the one
    that failed (None), and the thread policy (jobs at once, torch threads each)."""
    from featmap.core.io import atomic_write

    data = {"chapters": {c: seconds[c] for c in chapters if c in seconds}, "total_seconds": sum(seconds.values()),
            "wall_seconds": wall, "jobs": jobs, "threads_per_chapter": threads,
            "asked": chapters, "complete": failed is None and all(c in seconds for c in chapters), "failed": failed,
            "cpus": available_cpus(), "python": platform.python_version(), "load_average_at_end": os.getloadavg()}
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def fold_injected(path: Path) -> None:
    """Folds the cell papermill injects with the given parameters (tag ``injected-parameters``) as the chapter's own
    parameters cell is folded (its ``hide-``/``remove-`` tags; ``hide-cell`` where it has none): a page shows its
    results first, the parameters one click away."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    fold = next(([t for t in tt if t.startswith(("hide-", "remove-"))] for tt in tags if "parameters" in tt), [])
    fold = fold or ["hide-cell"]
    changed = False
    for cell, tt in zip(nb.cells, tags):
        if "injected-parameters" in tt and not set(fold) <= set(tt):
            cell.metadata["tags"] = tt + [t for t in fold if t not in tt]
            changed = True
    if changed:
        nbformat.write(nb, path)


# Chapters that read the other chapters' results (and write none): they run after every other chapter asked for, side
# by side like the others, in the order given.
READS_RESULTS = ("summary", "intro")
# The measured cost order of the other chapters (longest first; see the README): a pool of workers takes the longest
# waiting chapter first, so the last one to start is a short one. Chapters not listed go last, in the order given.
# Cold on 2 cores (seconds): geometric 627, masking 356, semantic 341, backbones 191, layers 89, data 5. On two
# workers: geometric + backbones against masking + semantic + layers + data.
COST_ORDER = ("geometric", "masking", "semantic", "backbones", "layers", "data")


def available_cpus() -> int:
    """Returns the cores this process may run on (its CPU affinity where the platform reports one, else the
    machine's count): what the thread policy divides."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover (macOS, Windows)
        return os.cpu_count() or 1


def default_jobs(cpus: int | None = None) -> int:
    """Returns how many chapters run at once by default: one per core, at most three (each holds its photos' maps
    in memory)."""
    return max(1, min(3, cpus or available_cpus()))


def schedule(chapters: list[str]) -> tuple[list[str], list[str]]:
    """Returns (the independent chapters, longest first; the chapters that read their results, in order given)."""
    first = [c for c in chapters if c not in READS_RESULTS]
    rank = {c: i for i, c in enumerate(COST_ORDER)}
    first = sorted(first, key=lambda c: (rank.get(c, len(rank)), first.index(c)))
    return first, [c for c in chapters if c in READS_RESULTS]


CHAPTER_ENV = "FEATMAP_BOOK_CHAPTER"  # set in every chapter's process: which chapter it is
# Warnings no page shows, as Python's -W options: a chapter's kernel gets them in PYTHONWARNINGS, so they hold before
# its first cell imports anything. huggingface_hub (imported by timm) imports tqdm.auto, which in a kernel without
# ipywidgets warns that it cannot draw progress widgets: the book draws none (progress goes to the terminal), so the
# notice is not news to anyone reading the page.
PAGE_WARNINGS = ("ignore:IProgress not found:Warning",)


class _Chapter:
    """One chapter executed by papermill in its own process, with its own progress file and thread count."""

    def __init__(self, chapter: str, book: Path, stage: Path, progress: Path, threads: int,
                 parameters: dict | None, env: dict | None):
        self.chapter = chapter
        self.log, self.err = progress / f"{chapter}.log", progress / f"{chapter}.err"
        self.log.unlink(missing_ok=True)
        # featmap's allocator settings (featmap.core.memory) from the start of papermill and its kernel; a MALLOC_*
        # variable already set wins, as do -W options already in PYTHONWARNINGS (later options take precedence)
        full = {**allocator_env(), **os.environ, **(env or {}), PROGRESS_ENV: str(self.log), CHAPTER_ENV: chapter}
        full["PYTHONWARNINGS"] = ",".join(PAGE_WARNINGS + tuple(filter(None, [full.get("PYTHONWARNINGS")])))
        # the thread policy: every chapter's torch (and its BLAS) gets `threads` threads (chapters whose `threads`
        # parameter is None take torch's default, which these variables set)
        full.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        self.out = stage / "book" / f"{chapter}.ipynb"
        command = [sys.executable, "-m", "papermill", str(book / f"{chapter}.ipynb"), str(self.out), "--cwd",
                   str(stage / "book"), "--no-progress-bar", "--no-log-output"]
        if parameters:
            given = progress / f"{chapter}.parameters.json"  # JSON is YAML: papermill's -f reads it
            given.write_text(json.dumps(parameters))
            command += ["-f", str(given)]
        self.follow = _Follow(self.log, chapter)
        self.follow.start()
        self.start = time.perf_counter()
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(command, env=full, stdout=subprocess.DEVNULL, stderr=err)

    def finish(self) -> float:
        self.follow.done.set()
        self.follow.join()
        return time.perf_counter() - self.start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.finish()

    def error(self) -> str:
        """Returns the end of papermill's error output: the failing cell's exception."""
        text = self.err.read_text(errors="replace") if self.err.is_file() else ""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return "\n".join(lines[-30:]) or f"papermill exited with status {self.proc.returncode}"


@dataclass
class BookRun:
    """What ``run_book`` did: seconds per finished chapter, the wall time, the failed chapters with their errors."""

    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0
    jobs: int = 1
    threads: int = 1


def run_book(chapters: list[str], book: Path, stage: Path, timings: Path | None = None, jobs: int | None = None,
             parameters: dict[str, dict] | None = None, env: dict | None = None,
             keep_going: bool = False) -> BookRun:
    """Runs ``book/<chapter>.ipynb`` for every chapter into ``stage/book/``; returns what it did (``BookRun``) and
    writes the timings to ``timings`` (JSON, see ``write_timings``) after every chapter when given.

    ``jobs`` chapters run at once (default ``default_jobs()``), each in its own papermill process with
    ``available_cpus() // jobs`` torch threads (the thread policy: never more threads than cores); the chapters that
    read the others' results (``READS_RESULTS``) run after them, also ``jobs`` at once. Chapters share their caches
    safely: entries are written atomically and the costly shared ones (an inverter) are computed once under a lock.
    ``parameters``: chapter -> the values papermill passes; ``env``: variables every chapter's process gets.

    A failing chapter (papermill writes its notebook, error included) stops the run with its error, stopping the
    chapters still running; with ``keep_going`` it is recorded in ``failed`` and the others go on.
    """
    jobs = max(1, int(jobs or default_jobs()))
    run = BookRun(jobs=jobs, threads=max(1, available_cpus() // jobs))
    stage = stage.resolve()
    (stage / "book").mkdir(parents=True, exist_ok=True)
    progress = stage / "progress"  # absolute: the kernels run in stage/book
    progress.mkdir(exist_ok=True)
    first, last = schedule(chapters)
    print(f"book: {len(chapters)} chapters, {jobs} at once with {run.threads} thread(s) each", flush=True)
    t0 = time.perf_counter()

    def save() -> None:
        run.wall = time.perf_counter() - t0
        if timings is not None:
            failed = next(iter(run.failed), None)
            write_timings(timings, run.seconds, chapters, failed, run.wall, jobs, run.threads)

    for group in (first, last):
        waiting, running = list(group), []
        while waiting or running:
            while waiting and len(running) < jobs:
                chapter = waiting.pop(0)
                print(f"book: {chapter} ...", flush=True)
                running.append(_Chapter(chapter, book.resolve(), stage, progress, run.threads,
                                        (parameters or {}).get(chapter), env))
            time.sleep(0.2)
            for done in [r for r in running if r.proc.poll() is not None]:
                running.remove(done)
                seconds = done.finish()
                if done.proc.returncode != 0:
                    run.failed[done.chapter] = done.error()
                    if not keep_going:
                        for other in running:
                            other.stop()
                        save()
                        raise RuntimeError(f"book: the {done.chapter} chapter failed (its notebook, error included: "
                                           f"{done.out}):\n{run.failed[done.chapter]}")
                    print(f"book: {done.chapter} FAILED after {seconds:.0f} s", flush=True)
                else:
                    run.seconds[done.chapter] = seconds
                    print(f"book: {done.chapter} done in {seconds:.0f} s", flush=True)
                if done.out.is_file():
                    fold_injected(done.out)
                save()
    save()
    print("book: " + ", ".join(f"{c} {s:.0f} s" for c, s in run.seconds.items())
          + f"; wall {run.wall:.0f} s ({jobs} at once)", flush=True)
    return run


def main(argv: list[str]) -> int:
    """``python -m featmap book STAGE CHAPTER ... [--json PATH] [--jobs N]``: runs the chapters into STAGE (see
    ``run_book``); ``--json PATH`` writes the per-chapter seconds there; ``--jobs N`` runs N chapters at once.
    Returns 1 when a chapter fails (its error printed), 2 for a bad command line."""
    from featmap.core.io import REPO_ROOT

    usage = "usage: python -m featmap book STAGE CHAPTER [CHAPTER ...] [--json PATH] [--jobs N]"
    argv, options = list(argv), {}
    for flag in ("--json", "--jobs"):
        if flag in argv:
            at = argv.index(flag)
            if at + 1 >= len(argv):
                print(f"{flag} needs a value; {usage}", file=sys.stderr)
                return 2
            options[flag] = argv.pop(at + 1)
            argv.pop(at)
    if len(argv) < 2 or any(a.startswith("-") for a in argv):
        print(usage, file=sys.stderr)
        return 2
    jobs = options.get("--jobs")
    if jobs is not None and not (jobs.isdigit() and int(jobs) > 0):
        print(f"--jobs must be a positive number of chapters run at once, got {jobs!r}", file=sys.stderr)
        return 2
    timings = Path(options["--json"]) if "--json" in options else None
    try:
        run_book(argv[1:], REPO_ROOT / "book", Path(argv[0]), timings, int(jobs) if jobs else None)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    return 0
