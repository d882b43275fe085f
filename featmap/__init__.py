"""featmap: how do feature maps change under image edits, and how simple is the map between them.

Importing it changes nothing outside the package: the command line (``featmap.__main__``) and ``make book``'s runner
(``featmap.run.book``) set the allocator (``featmap.core.memory``) and what the pages' kernels keep quiet.
"""
__all__ = ["RunConfig", "RunResult", "run_chapter"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``featmap.run_chapter``, ``RunConfig`` and ``RunResult`` load the pipeline (torch, timm) on first use, so the
    pages that only read results tables do not pay for it."""
    if name in ("RunResult", "run_chapter"):
        from featmap.run import chapter
        return getattr(chapter, name)
    if name == "RunConfig":
        from featmap.run.config import RunConfig
        return RunConfig
    raise AttributeError(f"module 'featmap' has no attribute {name!r}")
