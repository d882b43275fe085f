"""Command line: ``python -m featmap prepare --chapter NAME [-f params.yaml] [-y YAML] [-p name value ...]``.

``prepare`` runs a chapter's heavy steps (editing, extraction, every fit) into the caches, on one process or
data-parallel under ``torchrun --nproc-per-node N -m featmap prepare ...``; the chapter run (papermill, or
``featmap.run_chapter``) with the same parameters then finds everything cached. Parameters are the chapter's
(``featmap.run.presets`` defines them; the notebooks' parameters cells are generated from it) and are given as
papermill takes them. ``params --chapter NAME`` prints a chapter's parameters cell; ``params --write`` rewrites
every notebook's from the one definition.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from featmap.core.io import REPO_ROOT, atomic_write

if TYPE_CHECKING:
    from featmap.run.config import RunConfig

# The commands import what they need when they run: ``make book``'s runner (``book``) starts in 0.1 s instead of
# the 4.5 s that torch and the pipeline took before its first chapter could start.
BOOK = REPO_ROOT / "book"


def build_config(chapter: str, files: list[str], yamls: list[str], params: list[list[str]]) -> RunConfig:
    """Returns the RunConfig of ``chapter``: its defaults (``featmap.run.presets``), then parameter files, YAML
    strings and ``-p`` pairs in that order (later wins), as papermill applies them. Unknown names are refused with
    the nearest known one."""
    import yaml

    from featmap.run.presets import chapter_config

    values = {}
    for text in [Path(f).read_text() for f in files] + yamls:
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"parameters must be a YAML mapping of name: value, got {text!r}")
        values.update(loaded)
    for name, value in params:
        values[name] = yaml.safe_load(value)
    config, _ = chapter_config(chapter, values)
    if config is None:
        raise ValueError(f"the {chapter} chapter reads results tables and has nothing to prepare")
    return config


def write_parameter_cells(book: Path = BOOK) -> list[str]:
    """Rewrites the parameters cell of every chapter notebook in ``book`` from ``featmap.run.presets``; returns the
    chapters changed."""
    from featmap.run.presets import PRESETS, parameters_cell

    changed = []
    for chapter in PRESETS:
        path = book / f"{chapter}.ipynb"
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        source = parameters_cell(chapter).splitlines(keepends=True)
        if cell["source"] != source:
            cell["source"] = source
            atomic_write(path, lambda f, nb=nb: f.write((json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode()))
            changed.append(chapter)
    return changed


def _parser() -> argparse.ArgumentParser:
    from featmap.run.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m featmap", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="run a chapter's heavy steps into the caches (torchrun for many processes)")
    prep.add_argument("--chapter", required=True, choices=[c for c, p in PRESETS.items() if p.shown],
                      help="chapter name (its defaults: featmap.run.presets)")
    prep.add_argument("-f", "--parameters-file", action="append", default=[], metavar="FILE",
                      help="YAML file of parameters (as papermill -f)")
    prep.add_argument("-y", "--parameters-yaml", action="append", default=[], metavar="YAML",
                      help="YAML string of parameters, e.g. 'layers: [blocks.6]' (as papermill -y)")
    prep.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                      help="one parameter, value read as YAML (as papermill -p)")
    prep.add_argument("--summary", metavar="JSON", help="also write the run summary (counts, seconds) here")
    prep.add_argument("--fits", metavar="PT", help="also write the closed-form maps (torch.save of tensors) here")
    prep.add_argument("--timeout-minutes", type=float, default=60.0,
                      help="how long a rank waits for the others at a collective before failing (default 60)")
    params = sub.add_parser("params", help="print a chapter's parameters cell, or --write every notebook's")
    params.add_argument("--chapter", choices=list(PRESETS), help="the chapter whose cell to print")
    params.add_argument("--write", action="store_true", help="rewrite the parameters cell of every book/*.ipynb")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["book"]:  # make book's runner: python -m featmap book STAGE CHAPTER ...
        from featmap.run.book import main as book

        return book(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "params":
        if args.write:
            print("rewrote:", ", ".join(write_parameter_cells()) or "nothing (every cell is current)")
        elif args.chapter:
            from featmap.run.presets import parameters_cell

            print(parameters_cell(args.chapter))
        else:
            print("give --chapter NAME to print one cell, or --write to rewrite the notebooks'", file=sys.stderr)
            return 2
        return 0
    from featmap.core.memory import keep_freed_memory

    keep_freed_memory()  # before torch allocates: freed maps are reused, not faulted in again (featmap.core.memory)
    import torch

    from featmap.core.distributed import init, shutdown
    from featmap.run.distributed import prepare_chapter

    config = build_config(args.chapter, args.parameters_file, args.parameters_yaml, args.parameter)
    context = init(config.device, args.timeout_minutes)
    try:
        summary = prepare_chapter(config, context)
    finally:
        shutdown(context)
    if context.is_main:
        fits = summary.pop("fits")
        if args.fits:
            atomic_write(Path(args.fits), lambda f: torch.save(fits, f))
        if args.summary:
            atomic_write(Path(args.summary), lambda f: f.write(json.dumps(summary, indent=1).encode()))
        per_rank = ", ".join(f"rank {r['rank']}: {r['images']} images" for r in summary["per_rank"])
        print(f"prepared {config.chapter} on {context.world_size} process(es): {summary['images_extracted']} images "
              f"extracted ({per_rank}) in {summary['extract_seconds']:.1f} s, {summary['closed_form_fits']} "
              f"closed-form fits in {summary['fit_seconds']:.1f} s, {len(summary['trained_maps'])} trained maps in "
              f"{summary['train_seconds']:.1f} s; total {summary['total_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
