"""Layout helpers for the report's pictures: stacking arcs, ink on a colour.

Pure geometry, no drawing: :func:`assign_levels` decides how high each
boundary arc of the module picture flies so that neither arcs' labels nor a
short arc inside a long one collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipec.plan import Boundary
from pipec.viz import palette
from pipec.viz.report_fmt import text_width


@dataclass(frozen=True)
class Arc:
    """One boundary tensor going from x1 (producer) to x2 (a consumer stage)."""

    x1: float
    x2: float
    label: str
    boundary: Boundary
    consumer: int

    @property
    def extent(self) -> tuple[float, float]:
        """The horizontal space the arc and its centred label take up."""
        mid = (self.x1 + self.x2) / 2
        half = text_width(self.label) / 2 + 4
        return min(self.x1, mid - half), max(self.x2, mid + half)


def assign_levels(arcs: list[Arc]) -> list[int]:
    """A level (0 = lowest) per arc: shorter arcs first, each one above every
    already placed arc it overlaps, so nested arcs nest and labels never touch."""
    levels = [0] * len(arcs)
    placed: list[int] = []
    for i in sorted(range(len(arcs)), key=lambda k: (arcs[k].x2 - arcs[k].x1, arcs[k].x1)):
        lo, hi = arcs[i].extent
        below = [levels[j] for j in placed if arcs[j].extent[0] < hi and lo < arcs[j].extent[1]]
        levels[i] = max(below) + 1 if below else 0
        placed.append(i)
    return levels


def text_color(background: str) -> str:
    """Black or white, whichever reads better on the ``#rrggbb`` background."""
    return palette.ink_on(background)
