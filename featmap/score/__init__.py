"""Numbers about predictions: feature, semantic and image-space metrics (with their direction), inverters, linear-map geometry."""
from featmap.score import images, metrics  # noqa: F401  (image metrics register in METRICS too)
