"""Local search for ``synth``: improve the best schedule found by swapping neighbouring actions.

Phase: schedule (generator from costs). Input: a compute-only schedule, a function
that simulates one (its step time, or None when it deadlocks or holds too much
memory) and a budget of simulations. Output: the best schedule reached.

Hill climbing (first improvement): on each rank, two adjacent actions change
places when that keeps every stage's forwards, input gradients and weight
gradients in micro-batch order and a micro-batch's own F, I, W in order; the
swap is kept when the simulated step gets shorter. This is the "or better" over
the zero-bubble paper's one-pass heuristic: the greedy pass decides each action
locally, the search checks each change against the whole step. Deterministic:
the pairs are tried in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable

from pipec.schedule.ir import Action, Schedule

Evaluate = Callable[[Schedule], "float | None"]


def swappable(a: Action, b: Action) -> bool:
    """Whether ``b`` may run right before ``a`` on the same rank (see the module docstring)."""
    return not (a.stage == b.stage and (a.kind is b.kind or a.microbatch == b.microbatch))


def improve(schedule: Schedule, step_time: float, evaluate: Evaluate, budget: int) -> tuple[Schedule, float]:
    """The best schedule reached from ``schedule`` (of ``step_time``) within ``budget``
    calls of ``evaluate``, and its step time."""
    rows = [list(r) for r in schedule.actions]
    best, used = step_time, 0
    improved = True
    while improved and used < budget:
        improved = False
        for r, row in enumerate(rows):
            i = 0
            while i + 1 < len(row) and used < budget:
                a, b = row[i], row[i + 1]
                if not swappable(a, b):
                    i += 1
                    continue
                row[i], row[i + 1] = b, a
                cand = schedule.model_copy(update={"actions": tuple(tuple(x) for x in rows)})
                used += 1
                found = evaluate(cand)
                if found is not None and found < best * (1 - 1e-12):
                    best, improved = found, True
                    i = max(0, i - 1)  # the moved action may move further
                else:
                    row[i], row[i + 1] = a, b
                    i += 1
            rows[r] = row
    return schedule.model_copy(update={"actions": tuple(tuple(x) for x in rows)}), best


__all__ = ["Evaluate", "improve", "swappable"]
