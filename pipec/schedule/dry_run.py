"""Dry run: execute a schedule's actions rank by rank under given costs.

Phase: schedule library (the engine under the validator's deadlock check, the
grid's columns and the simulator's timing). Input: a
:class:`~pipec.schedule.ir.Schedule` (compute-only or lowered), its
:class:`~pipec.schedule.stage_graph.StageGraph` and :class:`Costs`. Output: an
:class:`Execution` -- per action the time its rank reached it, started and
ended, and where ranks stopped if the run deadlocked. The semantics of the
actions are those of :mod:`pipec.schedule.simulator` (the model) and
:mod:`pipec.schedule.lowering` (the messages).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from pipec.schedule.ir import Action, ActionKind, Schedule
from pipec.schedule.stage_graph import StageGraph

_K = ActionKind


class Costs(NamedTuple):
    """Per-stage costs in seconds; ``comm_action`` is what a SEND/RECV action
    itself takes (0 in simulations; the grid gives it one step).

    A message's latency: ``transfers[(producer, consumer, forward)]`` for the
    stage edge ``producer -> consumer`` (``forward`` False for the gradient
    back) when ``transfers`` is given -- a plan's boundary transfer times, each
    charged once -- else ``comm[producer]``."""

    forward: tuple[float, ...]
    input_grad: tuple[float, ...]
    weight_grad: tuple[float, ...]
    comm: tuple[float, ...]
    comm_action: float = 0.0
    full_backward: tuple[float, ...] | None = None  # B's cost when not input_grad + weight_grad
    transfers: Mapping[tuple[int, int, bool], float] | None = None
    # the runtime's own seconds per action (RuntimeOverhead.of_kind), added to each
    # action's duration; a RECV's is spent after its messages arrived
    overhead: Mapping[ActionKind, float] | None = None

    def latency(self, producer: int, consumer: int, forward: bool) -> float:
        """Seconds a message on the edge ``producer -> consumer`` takes (see above)."""
        if self.transfers is None:
            return self.comm[producer]
        return self.transfers.get((producer, consumer, forward), 0.0)


def unit_costs(num_stages: int) -> Costs:
    """One step per action, comm included: the dry run and the grid use these."""
    ones = (1.0,) * num_stages
    return Costs(ones, ones, ones, (0.0,) * num_stages, 1.0, ones)


class Blocked(NamedTuple):
    """Where a rank stopped in a dry run that deadlocked."""

    rank: int
    step: int
    action: Action
    waiting_for: tuple[Action, ...]


@dataclass(frozen=True)
class Execution:
    """Raw result of :func:`execute`: per rank, per executed action, the time the
    rank reached it, the time it started and the time it ended."""

    times: tuple[tuple[tuple[float, float, float], ...], ...]
    blocked: tuple[Blocked, ...]

    @property
    def finished(self) -> bool:
        return not self.blocked


def _dependencies(
    a: Action, graph: StageGraph, costs: Costs, lowered: bool
) -> list[tuple[Action, float]]:
    """(event, latency) pairs ``a`` waits for. ``Action(s, I, m)`` stands for
    "the input gradient of (s, m) is done", whether by ``B`` or ``I``."""
    s, m, kind = a.stage, a.microbatch, a.kind
    rank = graph.rank_of(s)
    if kind is _K.F:
        deps = []
        for p in graph.producers[s]:
            if graph.rank_of(p) == rank:
                deps.append((Action(p, _K.F, m), 0.0))
            elif not lowered:
                deps.append((Action(p, _K.F, m), costs.latency(p, s, True)))
        if lowered and graph.remote_producers[s]:
            deps.append((Action(s, _K.RECV_F, m), 0.0))
        return deps
    if kind in (_K.B, _K.I):
        deps = [(Action(s, _K.F, m), 0.0)]
        for c in graph.backward_consumers(s):  # consumers that send no gradient are not waited for
            if graph.rank_of(c) == rank:
                deps.append((Action(c, _K.I, m), 0.0))
            elif not lowered:
                deps.append((Action(c, _K.I, m), costs.latency(s, c, False)))
        if lowered and graph.remote_backward_consumers(s):
            deps.append((Action(s, _K.RECV_B, m), 0.0))
        return deps
    if kind is _K.W or kind is _K.SEND_B:
        return [(Action(s, _K.I, m), 0.0)]
    if kind is _K.SEND_F:
        return [(Action(s, _K.F, m), 0.0)]
    if kind is _K.RECV_F:
        return [(Action(p, _K.SEND_F, m), costs.latency(p, s, True)) for p in graph.remote_producers[s]]
    return [(Action(c, _K.SEND_B, m), costs.latency(s, c, False)) for c in graph.remote_backward_consumers(s)]


def _duration(a: Action, costs: Costs) -> float:
    extra = 0.0 if costs.overhead is None else costs.overhead.get(a.kind, 0.0)
    return _compute_duration(a, costs) + extra


def _compute_duration(a: Action, costs: Costs) -> float:
    kind, s = a.kind, a.stage
    if kind is _K.F:
        return costs.forward[s]
    if kind is _K.B:
        if costs.full_backward is not None:
            return costs.full_backward[s]
        return costs.input_grad[s] + costs.weight_grad[s]
    if kind is _K.I:
        return costs.input_grad[s]
    if kind is _K.W:
        return costs.weight_grad[s]
    return costs.comm_action


def execute(schedule: Schedule, graph: StageGraph, costs: Costs) -> Execution:
    """Run every rank's actions in order; stop where no rank can go on.

    Each rank advances as far as the events it waits for are known; a rank that
    waits is woken when the event it needs happens. O(number of actions).
    """
    rows = schedule.actions
    lowered = schedule.is_lowered
    num_ranks = len(rows)
    # per (stage, kind): the (stage, kind, latency) of its dependencies, and its duration
    plan: dict[tuple[int, ActionKind], tuple[tuple[tuple[int, ActionKind, float], ...], float]] = {}
    done: dict[tuple[int, ActionKind, int], float] = {}
    waiters: dict[tuple[int, ActionKind, int], list[int]] = {}
    pos = [0] * num_ranks
    clock = [0.0] * num_ranks
    times: list[list[tuple[float, float, float]]] = [[] for _ in rows]
    ready = deque(range(num_ranks))
    while ready:
        r = ready.popleft()
        row, out = rows[r], times[r]
        while pos[r] < len(row):
            a = row[pos[r]]
            s, kind, m = a
            entry = plan.get((s, kind))
            if entry is None:
                deps = _dependencies(a, graph, costs, lowered)
                entry = (tuple((d.stage, d.kind, lat) for d, lat in deps), _duration(a, costs))
                plan[(s, kind)] = entry
            t = clock[r]
            missing = None
            for ds, dk, latency in entry[0]:
                at = done.get((ds, dk, m))
                if at is None:
                    missing = (ds, dk, m)
                    break
                if at + latency > t:
                    t = at + latency
            if missing is not None:
                waiters.setdefault(missing, []).append(r)
                break
            end = t + entry[1]
            out.append((clock[r], t, end))
            clock[r] = end
            pos[r] += 1
            done[a] = end
            if a in waiters:
                ready.extend(waiters.pop(a))
            if kind is _K.B:  # B also stands for "input gradient done"
                key = (s, _K.I, m)
                done[key] = end
                if key in waiters:
                    ready.extend(waiters.pop(key))
    blocked = []
    for r, row in enumerate(rows):
        if pos[r] < len(row):
            a = row[pos[r]]
            deps = _dependencies(a, graph, costs, lowered)
            blocked.append(Blocked(r, pos[r], a, tuple(d for d, _ in deps if d not in done)))
    return Execution(tuple(tuple(t) for t in times), tuple(blocked))


__all__ = ["Blocked", "Costs", "Execution", "execute", "unit_costs"]
