"""Command line: ``python -m featmap prepare --chapter NAME [-f params.yaml] [-y YAML] [-p name value ...]``.

``prepare`` runs a chapter's heavy steps (editing, extraction, every fit) into the caches, on one process or
data-parallel under ``torchrun --nproc-per-node N -m featmap prepare ...``; the chapter run (papermill, or
``featmap.run_chapter``) with the same parameters then finds everything cached. Parameters are the chapter
notebook's (its parameters cell gives the defaults) and are given as papermill takes them.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch
import yaml

from featmap.core.distributed import init, shutdown
from featmap.core.io import REPO_ROOT, atomic_write
from featmap.run.config import RunConfig
from featmap.run.distributed import prepare_chapter

BOOK = REPO_ROOT / "book"


def chapter_defaults(chapter: str, book: Path = BOOK) -> dict:
    """Returns the RunConfig parameters set in the parameters cell of ``book/<chapter>.ipynb`` ({} without one).

    Values are read as Python literals, never executed; names that are not RunConfig parameters (a chapter's
    own plotting settings) are left out.
    """
    path = book / f"{chapter}.ipynb"
    if not path.is_file():
        return {}
    cells = [c for c in json.loads(path.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    known, out = set(RunConfig.parameter_names()), {}
    for cell in cells:
        for node in ast.parse("".join(cell["source"])).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in known:
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def build_config(chapter: str, files: list[str], yamls: list[str], params: list[list[str]],
                 book: Path = BOOK) -> RunConfig:
    """Returns the RunConfig of ``chapter``: notebook defaults, then parameter files, YAML strings and ``-p``
    pairs in that order (later wins), as papermill applies them."""
    values = chapter_defaults(chapter, book)
    for text in [Path(f).read_text() for f in files] + yamls:
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"parameters must be a YAML mapping of name: value, got {text!r}")
        values.update(loaded)
    for name, value in params:
        values[name] = yaml.safe_load(value)
    unknown = sorted(set(values) - set(RunConfig.parameter_names()))
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; known: {', '.join(RunConfig.parameter_names())}")
    if "manipulations" not in values:
        raise ValueError(f"no book/{chapter}.ipynb gives default manipulations: pass -y 'manipulations: [...]'")
    return RunConfig(chapter=chapter, **values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m featmap", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="run a chapter's heavy steps into the caches (torchrun for many processes)")
    prep.add_argument("--chapter", required=True, help="chapter name; book/<chapter>.ipynb gives the defaults")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _parser().parse_args(argv)
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
