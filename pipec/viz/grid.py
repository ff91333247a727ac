"""A schedule as a coloured text grid for the terminal (``pipec show``).

Phase: viz (pure, no I/O). Input: a :class:`~pipec.schedule.ir.Schedule`.
Output: a ``rich.text.Text`` (:func:`schedule_grid_rich`) with the layout of
:func:`pipec.schedule.grid.schedule_grid` (the plain grid the validator's
errors draw), each action coloured by kind.
"""

from __future__ import annotations

from rich.text import Text

from pipec.schedule.grid import Columns, layout
from pipec.schedule.ir import ActionKind, Schedule

KIND_STYLE: dict[ActionKind, str] = {
    ActionKind.F: "bold blue",
    ActionKind.B: "bold green",
    ActionKind.I: "bold cyan",
    ActionKind.W: "bold magenta",
    ActionKind.SEND_F: "dim",
    ActionKind.RECV_F: "dim",
    ActionKind.SEND_B: "dim",
    ActionKind.RECV_B: "dim",
}


def schedule_grid_rich(schedule: Schedule, *, columns: Columns | None = None) -> Text:
    """:func:`schedule_grid` as a ``rich`` renderable, coloured by action kind."""
    cells, _, num_cols = layout(schedule, columns, ())
    width = max([len(t) for row in cells for t in row.values()] + [len(str(num_cols - 1)), 1])
    label = len(f"rank {len(cells) - 1}:")
    text = Text()
    text.append("step".ljust(label) + " " + " ".join(str(c).ljust(width) for c in range(num_cols)))
    for r, row in enumerate(cells):
        text.append("\n" + f"rank {r}:".ljust(label))
        for c in range(num_cols):
            cell = row.get(c)
            if cell is None:
                text.append(" " + ".".ljust(width), style="dim")
            else:
                kind = ActionKind(cell.strip("[]").lstrip("0123456789").rstrip("0123456789"))
                text.append(" " + cell.ljust(width), style=KIND_STYLE[kind])
    return text
