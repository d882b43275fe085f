"""Original -> manipulated feature maps: interface and registry, closed-form and trained maps, training pairs."""
from featmap.maps import closed_form, learned  # noqa: F401  (each registers its maps in MAPPINGS)
