"""Photos: the embedded default and user folders, decoding to RGB, views, the split by source photo."""
