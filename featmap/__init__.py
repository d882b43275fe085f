"""featmap: how do feature maps change under image edits, and how simple is the map between them."""
from .config import RunConfig
from .pipeline import RunResult, run_chapter

__all__ = ["RunConfig", "RunResult", "run_chapter"]
__version__ = "0.1.0"
