"""Original -> edited image: manipulations, object-level editors and their masks, generative editors, edit manifests."""
