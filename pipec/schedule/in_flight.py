"""Micro-batches in flight per stage: how much activation memory a schedule holds.

Phase: schedule library, used by the partitioner to size each stage's memory.

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
- ``zb-h2``, ``interleaved-zb``, ``zb-v``, ``dualpipe-v``: counted by walking the
  generated schedule (their docstrings give the peaks); ``synth`` by walking the
  schedule the plan stores.
- ``interleaved-1f1b``: counted by walking the generated schedule -- rank
  ``r`` warms up with ``(v - 1) * g + 2 (R - 1 - r)`` forwards spread over its
  ``v`` chunks in groups of ``g`` micro-batches (Narayanan et al. 2021 §2.2).

:func:`in_flight_formula` derives the counts from the generated schedule when
the generator accepts the sizes (one source of truth), else the closed forms.
"""

from __future__ import annotations

import logging

from pipec.schedule.generators import make_schedule
from pipec.schedule.ir import ActionKind, Schedule

log = logging.getLogger(__name__)


def in_flight_from_schedule(schedule: Schedule) -> tuple[int, ...]:
    """Peak micro-batches in flight on each stage of a (compute-only or lowered) schedule."""
    # a micro-batch ends with its full backward, or with its W when split (one stage may
    # do both, for different micro-batches: DualPipeV)
    return _peak_open(schedule, ActionKind.F, (ActionKind.W, ActionKind.B))


def _peak_open(schedule: Schedule, opens: ActionKind, closes: tuple[ActionKind, ...]) -> tuple[int, ...]:
    """Per stage, the most micro-batches at once between an ``opens`` action and one of ``closes``."""
    count = [0] * schedule.num_stages
    peak = [0] * schedule.num_stages
    for row in schedule.actions:
        for a in row:
            if a.kind is opens:
                count[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], count[a.stage])
            elif a.kind in closes:
                count[a.stage] -= 1
    return tuple(peak)


def in_backward_from_schedule(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose backward has started (``B`` or ``I``) and
    not ended (``B``, or ``W`` when split) at once: 1 for a whole ``B``; under ZB-H1
    a stage that keeps ``W`` back holds several. A recomputing stage holds all their
    activations (:mod:`pipec.costs.recompute`)."""
    return tuple(max(1, held) for held in held_for_weight_grad(schedule))


def held_for_weight_grad(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose ``I`` has run and whose ``W`` has not, at
    once (0 on stages whose backward is whole): each holds the gradients ``I`` captured
    for ``W`` (:mod:`pipec.runtime.backward`), about one per matmul-like node."""
    return _peak_open(schedule, ActionKind.I, (ActionKind.W,))


def in_flight_formula(schedule: str, num_stages: int, num_ranks: int, num_microbatches: int) -> tuple[int, ...]:
    """``in_flight[k]`` for a schedule by name (see the module docstring)."""
    s, r, m = num_stages, num_ranks, num_microbatches
    if s % r == 0:
        try:
            return in_flight_from_schedule(make_schedule(schedule, s, m, s // r))
        except Exception as exc:  # unknown name or sizes the generator refuses
            log.debug("in_flight: no generated %s schedule for S=%d R=%d m=%d (%s); using the closed form",
                      schedule, s, r, m, exc)
    if schedule in ("1f1b", "interleaved-1f1b"):
        return tuple(min(s - k, m) for k in range(s))
    if schedule == "zb-h1":
        return (min(r, m),) * s
    return (m,) * s  # gpipe, and the safe bound for anything unknown


__all__ = ["held_for_weight_grad", "in_backward_from_schedule", "in_flight_formula", "in_flight_from_schedule"]
