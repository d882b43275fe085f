"""The flat module paths of featmap 0.1 (``featmap.metrics``, ``featmap.pipeline``, ...), kept importable.

Each old path is a module whose names are looked up, on first use, in the new modules that now hold them, so
``from featmap.metrics import effective_rank`` and ``import featmap.inversion as inv; inv.CallableInverter`` keep
working. New code imports from the folders (``featmap.score.geometry``, ``featmap.score.inversion``, ...).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module -> the modules that now hold its public names, searched in order
MOVED = {
    "cache": ["core.io", "features.store"],
    "registry": ["core.registry"],
    "seeding": ["core.seeding"],
    "results": ["core.table", "core.bootstrap"],
    "metrics": ["score.metrics", "score.images", "score.geometry", "core.bootstrap", "data.images"],
    "analysis": ["score.geometry"],
    "images": ["data.images"],
    "manipulations": ["edits.manipulations"],
    "editors": ["edits.editors", "edits.semantic"],
    "generative": ["edits.generative"],
    "segmentation": ["edits.segmentation"],
    "edit_manifest": ["edits.manifest"],
    "backbones": ["features.backbone", "core.device"],
    "extraction": ["features.store"],
    "training": ["train.loop", "train.normalizer"],
    "mappings": ["maps.base", "maps.stats", "maps.closed_form"],
    "learned": ["maps.learned"],
    "inversion": ["score.inversion"],
    "imagespace": ["score.imagespace"],
    "pipeline": ["run.chapter", "run.plan", "maps.base", "maps.data", "score.semantic"],
    "distributed": ["run.distributed", "core.distributed", "maps.data"],
    "layerwise": ["run.layers", "report.trends"],
    "config": ["run.config"],
    "claims": ["report.claims"],
    "plots": ["report.plots"],
}


class _Moved(types.ModuleType):
    """An old module path: attribute lookups go to the modules that hold the names now."""

    def __init__(self, name: str, homes: list[str]):
        super().__init__(name, f"Moved: the names of {name} now live in " + ", ".join(f"featmap.{h}" for h in homes))
        self._homes = homes

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self._homes:
            module = importlib.import_module(f"featmap.{home}")
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"{self.__name__} has no {attr!r} (looked in "
                             + ", ".join(f"featmap.{h}" for h in self._homes) + ")")

    def __dir__(self):
        return sorted({n for h in self._homes for n in dir(importlib.import_module(f"featmap.{h}"))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("featmap.")
        if fullname.startswith("featmap.") and old in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Moved(spec.name, MOVED[spec.name.removeprefix("featmap.")])

    def exec_module(self, module):
        pass


def install() -> None:
    """Makes the old module paths importable (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
