"""A schedule as a text grid: one row per rank, one column per time step.

Phase: schedule library (pure, no I/O; the validator draws its errors with it).
Input: a :class:`~pipec.schedule.ir.Schedule`. Output: a plain string
(:func:`schedule_grid`); :mod:`pipec.viz.grid` colours the same layout for the
terminal. Columns come from a dry run in which every action (communication
included) takes one step, so bubbles show as ``.``; a schedule that deadlocks
or is malformed is drawn one action per column instead. The validator marks
the offending actions as ``[1B0]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipec.schedule.dry_run import execute, unit_costs
from pipec.schedule.ir import Schedule
from pipec.schedule.stage_graph import BoundarySpec, graph_of

Columns = Sequence[Sequence[int]]


def index_columns(schedule: Schedule) -> list[list[int]]:
    """The k-th action of each rank in column k."""
    return [list(range(len(row))) for row in schedule.actions]


def unit_columns(
    schedule: Schedule, boundaries: Sequence[BoundarySpec] | None = None
) -> list[list[int]]:
    """Columns from a dry run with one step per action; actions a deadlock never
    reaches follow their rank's last executed action, one per column."""
    n = schedule.num_stages
    if any(
        not 0 <= a.stage < n or schedule.rank_of(a.stage) != r
        for r, row in enumerate(schedule.actions)
        for a in row
    ):
        return index_columns(schedule)
    run = execute(schedule, graph_of(schedule, boundaries), unit_costs(n))
    columns = []
    for row, times in zip(schedule.actions, run.times):
        cols = [round(start) for _, start, _ in times]
        nxt = round(times[-1][2]) if times else 0
        cols += list(range(nxt, nxt + len(row) - len(times)))
        columns.append(cols)
    return columns


def layout(
    schedule: Schedule, columns: Columns | None, marks: Iterable[tuple[int, int]]
) -> tuple[list[dict[int, str]], int, int]:
    """Per rank ``column -> cell text``, the first marked column, the number of columns."""
    cols = unit_columns(schedule) if columns is None else columns
    marked = set(marks)
    cells: list[dict[int, str]] = []
    for r, row in enumerate(schedule.actions):
        by_col: dict[int, str] = {}
        for i, a in enumerate(row):
            text = f"[{a}]" if (r, i) in marked else str(a)
            by_col[cols[r][i]] = text
        if len(by_col) < len(row):  # two actions in one column: fall back
            return layout(schedule, index_columns(schedule), marked)
        cells.append(by_col)
    num_cols = max((max(c, default=-1) for c in cells), default=-1) + 1
    marked_cols = {cols[r][i] for r, i in marked if r < len(cols) and i < len(cols[r])}
    return cells, min(marked_cols, default=0), num_cols


def schedule_grid(
    schedule: Schedule,
    *,
    marks: Iterable[tuple[int, int]] = (),
    columns: Columns | None = None,
    window: int | None = None,
) -> str:
    """The schedule as text, ranks down and time steps across.

    ``marks`` are ``(rank, index)`` positions (index into ``schedule.actions[rank]``)
    drawn in brackets. ``columns`` gives each action's column (default: the
    one-step dry run). ``window`` keeps at most that many columns, around the
    first mark.
    """
    cells, first, num_cols = layout(schedule, columns, marks)
    width = max([len(t) for row in cells for t in row.values()] + [len(str(num_cols - 1)), 1])
    lo, hi = 0, num_cols
    if window is not None and num_cols > window:
        lo = max(0, min(first - window // 2, num_cols - window))
        hi = lo + window
    label = len(f"rank {len(cells) - 1}:")

    def line(head: str, texts: list[str]) -> str:
        body = " ".join(t.ljust(width) for t in texts)
        pre = "... " if lo > 0 else ""
        post = " ..." if hi < num_cols else ""
        return f"{head.ljust(label)} {pre}{body}{post}".rstrip()

    lines = [line("step", [str(c) for c in range(lo, hi)])]
    for r, row in enumerate(cells):
        lines.append(line(f"rank {r}:", [row.get(c, ".") for c in range(lo, hi)]))
    return "\n".join(lines) + "\n"


__all__ = ["Columns", "index_columns", "layout", "schedule_grid", "unit_columns"]
