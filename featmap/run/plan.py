"""The plan of a run: every cell (manipulation x layer x spatial mode) with the maps it fits and what it scores,
resolved once from the configuration. The chapter run, the layers run and the distributed prepare all execute
the same plan."""
from __future__ import annotations

from dataclasses import dataclass

from featmap.core.table import comparable_spatial
from featmap.edits.editors import SplitEdit
from featmap.edits.manipulations import Manipulation
from featmap.maps.base import GLOBAL_MAPS, MAPPINGS, Mapping
from featmap.run.config import RunConfig


def spatial_modes(manipulation: Manipulation | SplitEdit, configured: list[str],
                  controls: tuple[str, ...] = ()) -> list[str]:
    """Returns the spatial modes a manipulation runs in: the configured ones for geometric edits (and ``learned``
    for those named in ``controls``), ``none`` else."""
    if manipulation.grid_op is None:
        return ["none"]
    extra = ["learned"] if manipulation.name in controls and "learned" not in configured else []
    return list(configured) + extra


def applies(mapping: type[Mapping], manipulation: Manipulation | SplitEdit, spatial: str) -> bool:
    """Returns whether ``mapping`` runs in this spatial mode.

    Geometric edits: ``applied`` runs every map after the grid rotation/flip; on the raw grid, the closed-form maps
    that act on each position alone run as ``none`` (they cannot move content: the floor for geometry; a trained
    per-position map would only cost its training there) and maps that mix positions run as ``learned`` (they may
    learn the permutation). Other edits: ``none``.
    """
    if manipulation.grid_op is None or spatial == "applied":
        return True
    if spatial == "none":
        return mapping.per_position and not mapping.learned
    return not mapping.per_position


@dataclass(frozen=True)
class Cell:
    """One (manipulation, layer, spatial mode) of a run: the maps fit there and what their predictions feed."""

    manipulation: Manipulation | SplitEdit
    layer: str
    spatial: str
    mappings: tuple[type[Mapping], ...]
    semantics: bool            # predictions go through the classifier tail
    images: tuple[str, ...]    # maps whose predictions are reconstructed and scored in image space

    @property
    def comparable(self) -> bool:
        """Returns whether every map of the cell sees the same input (see ``core.table.comparable_spatial``)."""
        return self.spatial == comparable_spatial(self.manipulation.grid_op is not None)

    @property
    def name(self) -> str:
        return f"{self.manipulation.name}/{self.layer}/{self.spatial}"


@dataclass(frozen=True)
class Plan:
    """Every cell of a run, in execution order (manipulation, then layer in depth order, then spatial mode)."""

    cells: tuple[Cell, ...]

    @classmethod
    def build(cls, config: RunConfig, manipulations: list[Manipulation | SplitEdit], layers: list[str],
              image_layers: set[str] = frozenset(), semantics: bool = True) -> "Plan":
        """Returns the plan of ``config`` over ``manipulations`` (checked and bound) at ``layers``.

        ``image_layers``: layers with an inverter (image space is scored there, in the comparable mode only);
        ``semantics``: whether the backbone has a classifier head at all.
        """
        classes = [MAPPINGS.get(name) for name in config.mappings]
        cells = []
        for manip in manipulations:
            for layer in layers:
                for spatial in spatial_modes(manip, config.spatial, tuple(config.control_edits)):
                    # a partner-based control shows what "not learnable" looks like with the closed-form maps; its
                    # target is not a function of the photo, so trained maps would only cost their training
                    maps = tuple(c for c in classes if applies(c, manip, spatial)
                                 and (not c.learned or (config.trains_on(layer) and not getattr(manip, "control",
                                                                                                 False))))
                    if spatial == "learned" and "learned" not in config.spatial:  # the positive control only
                        maps = tuple(c for c in maps if c.name in GLOBAL_MAPS)
                    cell = Cell(manip, layer, spatial, maps, semantics and config.scores_semantics_on(layer), ())
                    if layer in image_layers and cell.comparable:
                        cell = Cell(manip, layer, spatial, maps, cell.semantics,
                                    tuple(c.name for c in maps if c.name in config.image_mappings))
                    cells.append(cell)
        return cls(tuple(cells))

    def groups(self):
        """Yields (manipulation, layer, cells): the cells that share test features and scorers."""
        order: dict[tuple[str, str], list[Cell]] = {}
        for cell in self.cells:
            order.setdefault((cell.manipulation.name, cell.layer), []).append(cell)
        for cells in order.values():
            yield cells[0].manipulation, cells[0].layer, cells

    def fits(self) -> list[tuple[Cell, type[Mapping]]]:
        """Returns every (cell, mapping class) the plan fits, in order."""
        return [(cell, m) for cell in self.cells for m in cell.mappings]
