"""Phase partition: micro-batches in flight per stage, and the smallest memory that fits.

Input: a schedule (name or :class:`pipec.schedule.ir.Schedule`) and sizes.
Output: ``in_flight[k]``, the number of micro-batches whose activations stage
``k`` holds at its peak -- the multiplier of saved activations and boundary
buffers in :func:`pipec.partitioner.chain.stage_memory`.

Counting rule (the same as :mod:`pipec.schedule.simulator`): a micro-batch is
in flight on a stage from the start of its ``F`` to the end of its ``B`` (or
``W`` when the backward is split into ``I`` and ``W``). Per schedule, with
``S`` stages, ``R`` ranks and ``m`` micro-batches:

- ``gpipe``: ``m`` on every stage (all forwards before any backward).
- ``1f1b``: ``min(S - k, m)`` on stage ``k`` (PipeDream-Flush: stage ``k``
  warms up with ``S - k - 1`` forwards, Narayanan et al. 2021 §2.1).
- ``zb-h1``: ``min(R, m)`` on every stage: as 1F1B's first rank, but later
  ranks keep ``k`` weight passes back (Qi et al. 2023 §3.1); counted until
  ``W`` like the simulator does -- the brief's "same as 1F1B" is the peak of
  rank 0 only.
- ``interleaved-1f1b``: counted by walking the generated schedule -- rank
  ``r`` warms up with ``(v - 1) * g + 2 (R - 1 - r)`` forwards spread over its
  ``v`` chunks in groups of ``g`` micro-batches (Narayanan et al. 2021 §2.2).

:func:`in_flight_formula` derives the counts from the generated schedule when
the generator accepts the sizes (one source of truth), else the closed forms.
"""

from __future__ import annotations

import logging

from pipec.partitioner.problem import ChainProblem
from pipec.schedule.ir import ActionKind, Schedule

log = logging.getLogger(__name__)


def in_flight_from_schedule(schedule: Schedule) -> tuple[int, ...]:
    """Peak micro-batches in flight on each stage of a (compute-only or lowered) schedule."""
    split = {a.stage for row in schedule.actions for a in row if a.kind is ActionKind.W}
    count = [0] * schedule.num_stages
    peak = [0] * schedule.num_stages
    for row in schedule.actions:
        for a in row:
            if a.kind is ActionKind.F:
                count[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], count[a.stage])
            elif a.kind is ActionKind.W or (a.kind is ActionKind.B and a.stage not in split):
                count[a.stage] -= 1
    return tuple(peak)


def in_flight_formula(schedule: str, num_stages: int, num_ranks: int, num_microbatches: int) -> tuple[int, ...]:
    """``in_flight[k]`` for a schedule by name (see the module docstring)."""
    s, r, m = num_stages, num_ranks, num_microbatches
    if s % r == 0:
        try:
            from pipec.schedule.generators import make_schedule

            return in_flight_from_schedule(make_schedule(schedule, s, m, s // r))
        except Exception as exc:  # unknown name or sizes the generator refuses
            log.debug("in_flight: no generated %s schedule for S=%d R=%d m=%d (%s); using the closed form",
                      schedule, s, r, m, exc)
    if schedule in ("1f1b", "interleaved-1f1b"):
        return tuple(min(s - k, m) for k in range(s))
    if schedule == "zb-h1":
        return (min(r, m),) * s
    return (m,) * s  # gpipe, and the safe bound for anything unknown


def min_memory_limit(problem: ChainProblem) -> tuple[int, bool]:
    """The smallest per-rank memory limit for which some split fits, ignoring time.

    Returns ``(bytes, exact)``: exact (the minimum over splits of the largest
    stage memory) with one stage per rank; with several stages per rank the
    per-stage minimum is returned as a lower bound (``exact`` False).
    Phase: partition, used for the advice of an infeasible-memory error.
    """
    from pipec.partitioner.search import capped_dp, monotone_minmax

    tab = problem.tables
    s = problem.num_stages
    prefixes = [tab.prefix_memory(k).astype("float64") for k in range(s)]
    lower, _ = monotone_minmax(problem, prefixes)
    result = None
    for cap in [float(lower) * f for f in (1.0, 1.05, 1.25, 2.0, 4.0, 16.0)] + [float("inf")]:
        result = capped_dp(problem, time_cap=float("inf"), memory_caps=[cap] * s, objective="memory")
        if result is not None:
            break
    if result is None:  # unreachable when enough cut positions exist; keep a bound
        return int(lower), False
    return int(result[0]), problem.ranks == s


__all__ = ["in_flight_formula", "in_flight_from_schedule", "min_memory_limit"]
