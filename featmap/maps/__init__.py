"""Original -> manipulated feature maps: the interface and registry, closed-form and trained maps, their training pairs."""
from featmap.maps import closed_form, learned  # noqa: F401  (each registers its maps in MAPPINGS)
