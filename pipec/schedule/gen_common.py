"""Argument checks and assembly shared by the schedule generators.

Phase: schedule (generators). Input: the sizes a generator was called with.
Output: ``num_ranks``, or a :class:`~pipec.schedule.ir.Schedule` built from rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action, Schedule, round_robin_placement, v_placement

#: schedules that hold several stages per rank (round-robin placement), any number >= 2
INTERLEAVED = frozenset({"interleaved-1f1b", "interleaved-zb"})
#: schedules with a V-shaped placement: exactly two stages per rank (:func:`~pipec.schedule.ir.v_placement`)
V_SHAPED = frozenset({"zb-v", "dualpipe-v"})
#: the schedule built from the plan's own costs (:mod:`pipec.schedule.synth`): one stage per rank, or a V
SYNTH = "synth"


def stage_depths(name: str, interleaved_depths: Sequence[int]) -> tuple[int, ...]:
    """The stages per rank schedule ``name`` accepts, out of 1, 2 (V) and ``interleaved_depths``
    (what the automatic search tries for it)."""
    if name in INTERLEAVED:
        return tuple(v for v in interleaved_depths if v >= 2)
    if name in V_SHAPED:
        return (2,)
    if name == SYNTH:
        return (1, 2)
    return (1,)


def _check_count(name: str, what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(
            f"schedule {name!r}: {what} must be an integer >= 1, found {value!r}; "
            f"pass a positive whole number"
        )
    return value


def accepts_depth(name: str, stages_per_rank: int) -> bool:
    """Whether schedule ``name`` takes ``stages_per_rank`` (the rule :func:`check_sizes` enforces)."""
    if name in INTERLEAVED:
        return stages_per_rank >= 2
    if name in V_SHAPED:
        return stages_per_rank == 2
    return name == SYNTH or stages_per_rank == 1


def check_at_least(name: str, what: str, value: int, low: int, why: str) -> None:
    """A :class:`ScheduleError` unless ``value >= low`` (a generator's own size constraint)."""
    if value < low:
        raise ScheduleError(
            f"schedule {name!r} needs {what} >= {low}, found {value}; {why}"
        )


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
    if name in V_SHAPED and stages_per_rank != 2:
        raise ScheduleError(
            f"schedule {name!r} places two stages per rank in a V, found stages_per_rank={stages_per_rank}; "
            f"pass stages_per_rank=2 (and num_stages = 2 x the number of ranks)"
        )
    if name in INTERLEAVED and stages_per_rank < 2:
        raise ScheduleError(
            f"schedule {name!r} needs stages_per_rank >= 2, found {stages_per_rank}; "
            f"use '1f1b' for one stage per rank, or raise stages_per_rank"
        )
    if name not in INTERLEAVED and name not in V_SHAPED and name != SYNTH and stages_per_rank != 1:
        raise ScheduleError(
            f"schedule {name!r} runs one stage per rank, found stages_per_rank={stages_per_rank}; "
            f"use 'interleaved-1f1b' or 'interleaved-zb' for several stages per rank, 'zb-v' or "
            f"'dualpipe-v' for two in a V, or stages_per_rank=1"
        )
    return num_stages // stages_per_rank


def make(
    name: str,
    num_stages: int,
    num_microbatches: int,
    stages_per_rank: int,
    rows: Sequence[Sequence[Action]],
    *,
    v_shaped: bool = False,
) -> Schedule:
    """A :class:`Schedule` from one list of actions per rank (already well-typed
    :class:`Action` values, so pydantic's per-action coercion is skipped);
    round-robin placement, or the V of :func:`~pipec.schedule.ir.v_placement`."""
    placement = v_placement(num_stages, len(rows)) if v_shaped else round_robin_placement(num_stages, len(rows))
    return Schedule.model_construct(
        name=name,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        stages_per_rank=stages_per_rank,
        actions=tuple(tuple(row) for row in rows),
        placement=placement,
    )
