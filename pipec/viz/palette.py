"""The one palette of every pipec picture: what a colour means, in one place.

Phase: viz (pure data and small colour arithmetic, no drawing). Every picture
of the report -- the model's modules, the stage table, the memory bars, the
Gantt charts, memory over the step -- takes its colours from here, so that a
colour means the same thing everywhere:

- **hue = stage.** :func:`stage_colour` gives each stage one colour (Tableau 10
  without its grey, which means communication here; cycling after ten).
- **rank = the colour of its first stage.** Under round-robin and V-shaped
  placements alike rank ``r`` starts with stage ``r`` (:func:`rank_colour`).
- **shade = kind of work.** Forward is the solid stage colour, backward a
  light tint of it (:func:`kind_fill`); the weight-gradient half (W) of a split
  backward is the tint hatched with the stage colour, so I and W differ.
- **grey = communication** (:data:`COMM_COLOUR`), never a stage.
- **red = over a limit, green = chosen**, as on the rest of the page.

A schedule drawn on its own (``schedule.svg``, no stages to match) may instead
colour by kind (:data:`KIND_COLOURS`); the report always colours by stage.

The chrome (ink, muted ink, the track behind a bar) is here too so a picture
needs no colour literal of its own.
"""

from __future__ import annotations

from typing import Final

# Tableau 10 (colour-blind friendly, readable under dark ink) less its grey
# #bab0ac, too close to communication's grey; plus Tableau 20's raspberry.
STAGE_COLOURS: Final = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#d37295",
)
COMM_COLOUR: Final = "#9d9d9d"  # communication: a RECV's wait, comm time of a stage
PAPER: Final = "#ffffff"  # the page, and a label's backing over a picture
INK: Final = "#1f2328"  # text
MUTED_INK: Final = "#59636e"  # secondary text, values beside bars
LIGHT_INK: Final = "#ffffff"  # text on a dark fill
RULE: Final = "#d8dee4"  # grid lines
AXIS: Final = "#24292f"  # axes, limit ticks, the lower-bound line
TRACK: Final = "#eef1f4"  # the empty track behind a bar
BAD: Final = "#cf222e"  # over the memory limit, does not fit
BAD_BACKGROUND: Final = "#ffebe9"
GOOD: Final = "#1a7f37"  # the chosen candidate
NEUTRAL: Final = "#8c959f"  # a candidate that fits but was not chosen

# Colour by kind, for a schedule drawn on its own (pipec.viz.svg colour_by="kind").
KIND_COLOURS: Final = {"F": "#4e79a7", "B": "#59a14f", "I": "#76b7b2", "W": "#b07aa1"}

# How much of the way to white each kind's fill is (0 = the stage colour).
_TINT: Final = {"F": 0.0, "B": 0.5, "I": 0.5, "W": 0.5}
KIND_SHADE: Final = {
    "F": "solid",
    "B": "light",
    "I": "light",
    "W": "light, hatched",
}


def stage_colour(stage: int) -> str:
    """The colour of ``stage`` in every picture (``#rrggbb``, cycling)."""
    return STAGE_COLOURS[stage % len(STAGE_COLOURS)]


def rank_colour(rank: int) -> str:
    """The colour of ``rank``: that of its first stage, which is stage ``rank``."""
    return stage_colour(rank)


def _rgb(colour: str) -> tuple[int, int, int]:
    hex_ = colour.lstrip("#")
    if len(hex_) != 6:
        raise ValueError(f"expected a colour as #rrggbb, got {colour!r}")
    return int(hex_[0:2], 16), int(hex_[2:4], 16), int(hex_[4:6], 16)


def tint(colour: str, amount: float) -> str:
    """``colour`` moved ``amount`` (0..1) of the way to white."""
    r, g, b = _rgb(colour)
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in (r, g, b))


def kind_fill(stage: int, kind: str) -> str:
    """The fill of a ``kind`` action (``"F"``, ``"B"``, ``"I"``, ``"W"``) of
    ``stage``: the stage colour, lighter for backward work; grey for
    communication. A W box is additionally hatched (:func:`is_hatched`)."""
    if kind not in _TINT:
        return COMM_COLOUR
    return tint(stage_colour(stage), _TINT[kind])


def is_hatched(kind: str) -> bool:
    """Whether a ``kind`` box is hatched with its stage colour (W: weight grad)."""
    return kind == "W"


def ink_on(background: str) -> str:
    """Dark or white text, whichever reads better on ``background`` (#rrggbb)."""
    try:
        r, g, b = (c / 255 for c in _rgb(background))
    except ValueError:
        return INK
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return INK if luminance > 0.45 else LIGHT_INK
