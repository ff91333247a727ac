"""Greedy list scheduling of F, I and W under a memory cap: one candidate order for ``synth``.

Phase: schedule (generator from costs). Input: the stage graph (sizes, placement,
which stage feeds which), per-stage F / I / W seconds, each message's latency,
a cap on micro-batches in flight per stage, and a :class:`Policy`. Output: one
list of compute actions per rank.

The algorithm is the zero-bubble paper's automatic scheduler (Qi et al. 2023,
"Zero Bubble Pipeline Parallelism", section 3.1, "heuristic algorithm"): time
is simulated while the schedule is built, and each rank, whenever it is free,
takes

1. an ``I`` whose gradient has arrived (``I`` is on the critical path between ranks);
2. else an ``F`` whose input has arrived, if its stage holds fewer than its cap
   of micro-batches in flight (a micro-batch is in flight from its ``F`` to its ``W``);
3. else a pending ``W`` -- the weight gradient fills what would be a bubble --
   when the rank would otherwise wait at least ``w_fill`` of that ``W``'s time
   (or memory is full and a ``W`` frees it);
4. else it waits for the earliest input.

Actions are committed in order of start time over all ranks, so each choice
sees every message that can arrive before it. Within a stage, forwards, input
gradients and weight gradients each go in micro-batch order (the executor and
the lowering expect it). The policy's knobs (``I`` before or after ``F``, which
of a rank's stages goes first, ``w_fill``, the caps) give different orders;
:mod:`pipec.schedule.synth` tries several and keeps the fastest by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action, ActionKind
from pipec.schedule.stage_graph import StageGraph

_K = ActionKind


class Policy(NamedTuple):
    """The knobs of one greedy pass (see the module docstring)."""

    input_grad_first: bool = True  # I before F when both are ready
    late_stage_first: bool = True  # a rank's later stage first among its ready F (and I)
    w_fill: float = 0.0  # take a W when the wait ahead is >= w_fill x its time


class StageCosts(NamedTuple):
    """Per-stage seconds and the latency of each message (``latency[(p, c, forward)]``)."""

    forward: tuple[float, ...]
    input_grad: tuple[float, ...]
    weight_grad: tuple[float, ...]
    latency: Mapping[tuple[int, int, bool], float]


def greedy_order(
    graph: StageGraph,
    num_microbatches: int,
    costs: StageCosts,
    caps: Sequence[int],
    policy: Policy,
    rank_caps: Sequence[int] | None = None,
) -> list[list[Action]]:
    """One list of compute actions per rank (F, I, W), built as the module docstring says.

    ``rank_caps[r]``, when given, also caps the micro-batches in flight on rank ``r``
    over all its stages at once.
    Raises :class:`~pipec.errors.ScheduleError` when no rank can move (a cap below 1)."""
    n, m, ranks = graph.num_stages, num_microbatches, graph.num_ranks
    if any(c < 1 for c in caps):
        raise ScheduleError(f"synth: every stage needs a cap of at least 1 micro-batch in flight, found {list(caps)}")
    stages_of = [[s for s in range(n) if graph.rank_of(s) == r] for r in range(ranks)]
    if policy.late_stage_first:
        stages_of = [list(reversed(ss)) for ss in stages_of]
    f_end = [[math.inf] * m for _ in range(n)]
    i_end = [[math.inf] * m for _ in range(n)]
    nf, ni, nw = [0] * n, [0] * n, [0] * n
    free = [0.0] * ranks
    rows: list[list[Action]] = [[] for _ in range(ranks)]
    lat = costs.latency

    def arrive(src: int, dst: int, end: float, forward: bool) -> float:
        if graph.rank_of(src) == graph.rank_of(dst):
            return end
        edge = (src, dst, True) if forward else (dst, src, False)
        return end + lat.get(edge, 0.0)

    def f_ready(s: int) -> float:
        mb = nf[s]
        return max((arrive(p, s, f_end[p][mb], True) for p in graph.producers[s]), default=0.0)

    def i_ready(s: int) -> float:
        mb = ni[s]
        grads = (arrive(c, s, i_end[c][mb], False) for c in graph.backward_consumers(s))
        return max(f_end[s][mb], max(grads, default=0.0))

    def choose(r: int) -> tuple[float, int, Action] | None:
        """(start, priority, action) of what rank ``r`` takes next, or None if nothing is known yet."""
        t = free[r]
        best_f: tuple[float, Action] | None = None
        best_i: tuple[float, Action] | None = None
        pending_w: Action | None = None
        full = False
        held = sum(nf[s] - nw[s] for s in stages_of[r])
        for s in stages_of[r]:
            if ni[s] < nf[s]:
                ready = i_ready(s)
                if ready < math.inf and (best_i is None or ready < best_i[0]):
                    best_i = (ready, Action(s, _K.I, ni[s]))
            if nf[s] < m:
                # under a rank cap, keep room for one micro-batch of each later stage on the
                # rank that holds none: else the earlier stage's forwards fill the rank and
                # the later one, whose backward would free memory, starves
                reserve = 0 if rank_caps is None else sum(
                    1 for t in stages_of[r] if t > s and nf[t] < m and nf[t] == nw[t])
                if nf[s] - nw[s] >= caps[s] or (rank_caps is not None and held + reserve >= rank_caps[r]):
                    full = True
                else:
                    ready = f_ready(s)
                    if ready < math.inf and (best_f is None or ready < best_f[0]):
                        best_f = (ready, Action(s, _K.F, nf[s]))
            if pending_w is None and nw[s] < ni[s]:
                pending_w = Action(s, _K.W, nw[s])
        order = (best_i, best_f) if policy.input_grad_first else (best_f, best_i)
        for found in order:
            if found is not None and found[0] <= t:
                return t, 0, found[1]
        soonest = min((c[0] for c in (best_i, best_f) if c is not None), default=math.inf)
        if pending_w is not None:
            wait = soonest - t
            if full or wait >= policy.w_fill * costs.weight_grad[pending_w.stage]:
                return t, 1, pending_w
        if soonest < math.inf:
            for found in (best_i, best_f):
                if found is not None and found[0] == soonest:
                    return soonest, 2, found[1]
        return None

    def run(r: int, a: Action, start: float) -> None:
        s, mb = a.stage, a.microbatch
        if a.kind is _K.F:
            end = start + costs.forward[s]
            f_end[s][mb] = end
            nf[s] += 1
        elif a.kind is _K.I:
            end = start + costs.input_grad[s]
            i_end[s][mb] = end
            ni[s] += 1
        else:
            end = start + costs.weight_grad[s]
            nw[s] += 1
        free[r] = end
        rows[r].append(a)

    total = 3 * n * m
    choice: list[tuple[float, int, Action] | None] = [choose(r) for r in range(ranks)]
    for _ in range(total):
        best_r = -1
        for r, c in enumerate(choice):
            if c is not None and (best_r < 0 or (c[0], c[1], r) < (choice[best_r][0], choice[best_r][1], best_r)):  # type: ignore[index]
                best_r = r
        if best_r < 0:
            raise ScheduleError("synth: the greedy pass found no rank able to move (the caps are too small)")
        start, _, action = choice[best_r]  # type: ignore[misc]
        run(best_r, action, start)
        # the committed action can change what this rank and its neighbours take next
        touched = {best_r}
        s = action.stage
        touched.update(graph.rank_of(c) for c in graph.consumers[s])
        touched.update(graph.rank_of(p) for p in graph.producers[s])
        for r in touched:
            choice[r] = choose(r)
    return rows


__all__ = ["Policy", "StageCosts", "greedy_order"]
