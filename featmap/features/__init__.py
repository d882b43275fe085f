"""Images -> feature maps: the backbone (timm or offline weights), its classifier tail, the feature store."""
