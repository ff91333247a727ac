"""Argument checks and assembly shared by the schedule generators.

Phase: schedule (generators). Input: the sizes a generator was called with.
Output: ``num_ranks``, or a :class:`~pipec.schedule.ir.Schedule` built from rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action, Schedule, round_robin_placement

INTERLEAVED = frozenset({"interleaved-1f1b"})


def _check_count(name: str, what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(
            f"schedule {name!r}: {what} must be an integer >= 1, found {value!r}; "
            f"pass a positive whole number"
        )
    return value


def check_sizes(name: str, num_stages: int, num_microbatches: int, stages_per_rank: int) -> int:
    """Check a generator's arguments and return ``num_ranks``.

    Raises :class:`~pipec.errors.ScheduleError` with the fix for counts below 1,
    ``num_stages`` not divisible by ``stages_per_rank``, an interleaved schedule
    with one stage per rank, and a non-interleaved one with several.
    """
    _check_count(name, "num_stages", num_stages)
    _check_count(name, "num_microbatches", num_microbatches)
    _check_count(name, "stages_per_rank", stages_per_rank)
    if num_stages % stages_per_rank:
        raise ScheduleError(
            f"schedule {name!r}: num_stages={num_stages} is not divisible by "
            f"stages_per_rank={stages_per_rank}; every rank must hold the same number of "
            f"stages, so choose num_stages as a multiple of stages_per_rank"
        )
    if name in INTERLEAVED and stages_per_rank < 2:
        raise ScheduleError(
            f"schedule {name!r} needs stages_per_rank >= 2, found {stages_per_rank}; "
            f"use '1f1b' for one stage per rank, or raise stages_per_rank"
        )
    if name not in INTERLEAVED and stages_per_rank != 1:
        raise ScheduleError(
            f"schedule {name!r} runs one stage per rank, found stages_per_rank={stages_per_rank}; "
            f"use 'interleaved-1f1b' for several stages per rank, or stages_per_rank=1"
        )
    return num_stages // stages_per_rank


def make(
    name: str,
    num_stages: int,
    num_microbatches: int,
    stages_per_rank: int,
    rows: Sequence[Sequence[Action]],
) -> Schedule:
    """A :class:`Schedule` from one list of actions per rank (already well-typed
    :class:`Action` values, so pydantic's per-action coercion is skipped)."""
    return Schedule.model_construct(
        name=name,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        stages_per_rank=stages_per_rank,
        actions=tuple(tuple(row) for row in rows),
        placement=round_robin_placement(num_stages, len(rows)),
    )
