"""torch.distributed.pipelining's pipeline-order CSV, to and from a pipec :class:`Schedule`.

Phase: schedule (a format conversion beside the text form of :mod:`pipec.schedule.ir`).
torch's ``_PipelineScheduleRuntime`` reads a schedule as CSV (``_load_csv``): one
row per rank, one action per cell, written as pipec writes its actions
(``2F0``, ``0SEND_F1``: stage, kind, micro-batch). Two forms:

``compute_only``
    F, B, I, W only; cells may be empty (torch's generators pad each rank's row
    to a grid of time steps). torch lowers it itself (``_add_send_recv``).
``compute_comms``
    the lowered schedule, run exactly as written. Its SEND/RECV actions mean
    what pipec's do (:mod:`pipec.schedule.lowering`): ``sRECV_Fm`` on the rank
    of stage ``s`` receives ``s``'s input, ``sSEND_Bm`` sends ``s``'s input
    gradient to stage ``s - 1``, and no message passes between two stages on one
    rank. torch's lowering also emits ``REDUCE_GRAD`` after a stage's last
    backward (``B`` or ``W``): torch divides the stage's gradients by the number
    of micro-batches there, so :func:`to_torch_csv` writes it too, and
    ``UNSHARD`` / ``RESHARD`` for FSDP, which pipec neither writes nor needs.

Reading (:func:`from_torch_csv`, :func:`parse_torch_csv`): ``REDUCE_GRAD``,
``UNSHARD`` and ``RESHARD`` are dropped (pipec's runtime scales gradients
itself and does not shard), an ``OVERLAP_F_B`` cell -- ``(0F1;3B0)OVERLAP_F_B``
-- becomes its sub-actions as adjacent actions, in order, as torch's runtime
runs them one after the other; any other kind is a :class:`ScheduleError` naming
the cell. The placement (stage -> rank) is read from the rows, as torch infers
it, and the result is validated (:func:`pipec.schedule.validator.validate`), so
it can be simulated, drawn, lowered or handed to ``pipec.partition(schedule=...)``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action, ActionKind, Schedule, check_schedule
from pipec.schedule.stage_graph import BoundarySpec
from pipec.schedule.validator import validate

log = logging.getLogger(__name__)

#: torch's actions that pipec drops when reading: FSDP's (UN/RE)SHARD, and the
#: per-stage gradient reduction and scaling pipec's runtime does itself
IGNORED_KINDS: tuple[str, ...] = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
REDUCE_GRAD = "REDUCE_GRAD"

_KINDS = "|".join(sorted([k.value for k in ActionKind] + list(IGNORED_KINDS), key=len, reverse=True))
_CELL_RE = re.compile(rf"^(\d+)({_KINDS})(\d*)$")
_OVERLAP_RE = re.compile(r"^\((.*)\)OVERLAP_F_B$")


# -- writing ----------------------------------------------------------------------------


def torch_rows(schedule: Schedule, *, reduce_grad: bool = True) -> list[list[str]]:
    """One row of cells per rank: ``schedule``'s actions as torch writes them.

    A lowered schedule gets torch's ``REDUCE_GRAD`` after each stage's last ``B``
    or ``W`` when ``reduce_grad`` (what torch's own lowering adds; without it torch
    leaves the gradients summed over micro-batches instead of averaged)."""
    check_schedule(schedule, "to_torch_csv")
    rows: list[list[str]] = []
    for row in schedule.actions:
        cells: list[str] = []
        backwards: dict[int, int] = {}
        for action in row:
            cells.append(str(action))
            if reduce_grad and schedule.is_lowered and action.kind in (ActionKind.B, ActionKind.W):
                backwards[action.stage] = backwards.get(action.stage, 0) + 1
                if backwards[action.stage] == schedule.num_microbatches:
                    cells.append(f"{action.stage}{REDUCE_GRAD}")
        rows.append(cells)
    return rows


def to_torch_csv(schedule: Schedule, *, reduce_grad: bool = True) -> str:
    """``schedule`` as torch's pipeline-order CSV text: its ``compute_comms`` form when
    ``schedule`` is lowered, else its ``compute_only`` form (:func:`torch_rows`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for cells in torch_rows(schedule, reduce_grad=reduce_grad):
        writer.writerow(cells)
    return out.getvalue()


# -- reading ----------------------------------------------------------------------------


def from_torch_csv(
    path: str | Path,
    *,
    name: str | None = None,
    num_microbatches: int | None = None,
    boundaries: Sequence[BoundarySpec] | None = None,
) -> Schedule:
    """The schedule in torch's pipeline-order CSV file ``path`` (either form), validated.

    ``name`` defaults to the file's stem; ``num_microbatches`` to the largest
    micro-batch + 1. See :func:`parse_torch_csv`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScheduleError(
            f"cannot read torch's pipeline-order CSV {file}: {exc}; pass the path of a file written "
            "by torch's _dump_csv or `pipec export --format torch`"
        ) from None
    return parse_torch_csv(text, name=name or file.stem, num_microbatches=num_microbatches,
                           boundaries=boundaries, where=str(file))


def parse_torch_csv(
    text: str,
    *,
    name: str = "torch-csv",
    num_microbatches: int | None = None,
    boundaries: Sequence[BoundarySpec] | None = None,
    where: str = "torch CSV",
) -> Schedule:
    """A pipec :class:`Schedule` from torch's pipeline-order CSV ``text`` (module docstring).

    Lowered (SEND/RECV present) when the CSV is torch's ``compute_comms`` form,
    else compute-only. Raises :class:`ScheduleError` for a cell that is no
    action, an unknown action kind, a stage found on two ranks or missing, and
    for a schedule the validator refuses (``boundaries``: the plan's, for a
    lowered schedule with skip tensors; default a chain of stages)."""
    if not isinstance(text, str):
        raise ScheduleError(f"{where}: expected the CSV text as a str, found {type(text).__name__}; "
                            "use pipec.schedule.torch_csv.from_torch_csv(path) for a file")
    rows = [_parse_row(cells, rank, where) for rank, cells in enumerate(csv.reader(io.StringIO(text)))]
    while rows and not rows[-1]:
        rows.pop()  # a trailing blank line
    if not rows:
        raise ScheduleError(f"{where} is empty: expected one row of actions per rank such as '0F0,0B0'")
    actions = [a for row in rows for a in row]
    num_stages = max(a.stage for a in actions) + 1
    placement = _placement(rows, num_stages, where)
    found_mbs = max(a.microbatch for a in actions) + 1
    schedule = Schedule(
        name=name,
        num_stages=num_stages,
        num_microbatches=num_microbatches or found_mbs,
        stages_per_rank=max(1, num_stages // len(rows)),
        actions=tuple(tuple(row) for row in rows),
        placement=placement,
    )
    validate(schedule, boundaries)
    return schedule


def _parse_row(cells: Sequence[str], rank: int, where: str) -> list[Action]:
    out: list[Action] = []
    for column, raw in enumerate(cells):
        cell = raw.strip()
        if not cell:
            continue  # an idle time step in torch's compute_only grid
        overlap = _OVERLAP_RE.match(cell)
        subs = [s.strip() for s in overlap.group(1).split(";") if s.strip()] if overlap else [cell]
        for sub in subs:
            action = _parse_cell(sub, rank, column, where)
            if action is not None:
                out.append(action)
    return out


def _parse_cell(cell: str, rank: int, column: int, where: str) -> Action | None:
    m = _CELL_RE.match(cell)
    at = f"{where}, rank {rank} (row {rank + 1}), cell {column + 1}"
    if m is None:
        raise ScheduleError(
            f"{at}: cannot read {cell!r} as an action: expected <stage><kind><microbatch> with kind one of "
            f"{', '.join(k.value for k in ActionKind)} (or torch's {', '.join(IGNORED_KINDS)}, which pipec "
            "drops, and (a;b)OVERLAP_F_B); remove or rewrite the cell"
        )
    stage, kind, microbatch = int(m.group(1)), m.group(2), m.group(3)
    if kind in IGNORED_KINDS:
        log.info("%s: dropping %s (pipec's runtime scales and reduces gradients itself, without FSDP)", at, cell)
        return None
    if not microbatch:
        raise ScheduleError(f"{at}: {cell!r} has no micro-batch; write it as e.g. {stage}{kind}0")
    return Action(stage, ActionKind(kind), int(microbatch))


def _placement(rows: Sequence[Sequence[Action]], num_stages: int, where: str) -> tuple[int, ...]:
    """Stage -> rank, read from the rows (as torch's ``_validate_schedule`` infers it)."""
    rank_of: dict[int, int] = {}
    for rank, row in enumerate(rows):
        for action in row:
            other = rank_of.setdefault(action.stage, rank)
            if other != rank:
                raise ScheduleError(
                    f"{where}: stage {action.stage} has actions on rank {other} and on rank {rank} "
                    f"({action}); a stage runs on one rank: move its actions to one row"
                )
    missing = [s for s in range(num_stages) if s not in rank_of]
    if missing:
        raise ScheduleError(
            f"{where}: stages {missing} have no action (stages 0..{num_stages - 1} expected, as the largest "
            "stage index says); every stage needs its forward and backward actions"
        )
    return tuple(rank_of[s] for s in range(num_stages))


__all__ = ["IGNORED_KINDS", "from_torch_csv", "parse_torch_csv", "to_torch_csv", "torch_rows"]
