"""featmap: how do feature maps change under image edits, and how simple is the map between them."""
from featmap import _legacy
from featmap.core import progress  # noqa: F401  (first: routes progress away from pages before any library loads)
from featmap.run.chapter import RunResult, run_chapter
from featmap.run.config import RunConfig

_legacy.install()  # the flat module paths of featmap 0.1 (featmap.metrics, ...) keep working

__all__ = ["RunConfig", "RunResult", "run_chapter"]
__version__ = "0.1.0"
