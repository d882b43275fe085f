"""Sphinx extension for the book: MathJax served from the book's own ``_static``, never from a CDN.

Sphinx's default ``mathjax_path`` is a jsDelivr URL, so a page with math renders only online. This extension
points it at ``_static/mathjax/tex-mml-chtml.js`` (MathJax 3, the version Sphinx 7 configures) and copies the
files it loads (the bundle, TeX extensions loaded on demand, CHTML fonts, the menu) from the pinned
``django-static-mathjax`` wheel into the built HTML. Enabled in ``_config.yml`` (``sphinx: local_extensions``).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

BUNDLE = "tex-mml-chtml.js"
PARTS = [BUNDLE, "input", "output", "ui", "a11y", "adaptors"]  # not sre/ (speech rules) nor the other bundles


def mathjax_dir() -> Path:
    """Returns the es5 folder of the installed MathJax 3 copy (the ``django-static-mathjax`` wheel)."""
    from sphinx.errors import ExtensionError

    spec = importlib.util.find_spec("mathjax")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5" if spec else None
    if folder is None or not (folder / BUNDLE).is_file():
        raise ExtensionError("a local MathJax is missing: install the pinned django-static-mathjax wheel "
                             "(requirements.txt), which ships MathJax 3 as the 'mathjax' package")
    return folder


def _use_local(app, config) -> None:
    mathjax_dir()  # fail at the start of the build, not after rendering every page
    config.mathjax_path = f"mathjax/{BUNDLE}"  # relative: Sphinx serves it from _static/


def _copy(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
        elif (source / part).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / part, target / part)


def setup(app):
    app.connect("config-inited", _use_local)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
