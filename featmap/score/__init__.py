"""Numbers about predictions: feature, semantic and image metrics (with direction), inverters, map geometry."""
from featmap.score import images, metrics  # noqa: F401  (image metrics register in METRICS too)
