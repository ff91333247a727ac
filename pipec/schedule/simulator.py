"""Simulator: time a schedule exactly, event by event, under given per-stage costs.

Phase: schedule (last pass; its engine, :mod:`pipec.schedule.dry_run`, is also the
validator's dry run). Input: a
:class:`~pipec.schedule.ir.Schedule` (compute-only or lowered) and costs. Output:
:class:`Simulation` -- step time, bubble, per-rank busy time, in-flight
micro-batches, memory over time and the timeline.

The model. Each rank runs its actions in order, one at a time. A compute action
starts when the rank is free and its inputs are ready and takes its cost: ``F``
``forward``, ``I`` ``input_grad``, ``W`` ``weight_grad``, ``B`` ``input_grad +
weight_grad`` (of its stage). Communication costs latency, not compute: a
message from (or, for gradients, back to) stage ``s`` reaches the other rank
``comm[s]`` after it was sent -- or, given ``transfers``, a message on the
stage edge ``p -> c`` takes ``transfers[(p, c)]`` (forward, backward) seconds:
a plan's boundary transfer times, each charged once per message. In a lowered schedule a ``SEND`` takes no time
and a ``RECV`` ends when the last of its messages has arrived (the rank waits
there, as the runtime's blocking receive does). In a compute-only schedule the
transfers are implicit: a cross-rank input is ready ``comm`` after its producer
finished. This is an exact event simulation, not an estimate: there is no
contention other than each rank running one action at a time.

Memory: ``activation_bytes[s]`` is held per micro-batch of stage ``s`` from the
start of its ``F`` to the end of its ``B`` (or of its ``W`` when split); a
recomputing stage also holds ``replay_bytes[s]`` (the activations its replay
rebuilds) from the start of its ``B`` (or ``I``) to the end of its ``B`` (or ``W``). A
micro-batch is *in flight* on a rank over the same interval.

After the schedule, ``collectives`` run in the order given (the runtime's
tied-gradient all-reduces): each starts when the last of its ranks is free
and holds all of them for its duration; the step ends with the last of them.

``grad_allreduce[s]`` (data parallelism: stage ``s``'s gradient all-reduce
across the replicas) overlaps the schedule instead, as DDP's bucketed
reduction does: it starts when stage ``s``'s last backward (``B``, or ``W``
when split) of the step has ended, on its rank's communication stream -- one
all-reduce at a time per rank, in the order the stages finish -- and takes no
compute. Every replica runs the same schedule, so one pipeline's timeline is
every replica's. The step ends when the last all-reduce does.

The runtime's own cost (``overhead``, a :class:`~pipec.types.RuntimeOverhead`:
a plan's ``runtime_overhead``, from its hardware file, measured by ``pipec
calibrate``): each action takes its kind's overhead on top of its cost -- a
``SEND`` that long (its message leaves when it ends), a ``RECV`` that long after
its messages arrived -- and the step its ``step`` overhead (splitting the batch,
the step's end), added once to the step time; the timeline shows the actions only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from pipec.errors import ConfigError
from pipec.schedule.backends import plan_lowered
from pipec.schedule.dry_run import Costs, Execution, execute
from pipec.schedule.ir import Action, ActionKind, Schedule, check_schedule
from pipec.schedule.stage_graph import COMPUTE_KINDS, BoundarySpec, graph_of
from pipec.schedule.validator import check_static, raise_deadlock
from pipec.types import RuntimeOverhead

if TYPE_CHECKING:
    from pipec.plan import PlanData

_K = ActionKind


def per_stage(name: str, value: float | Sequence[float], num_stages: int) -> tuple[float, ...]:
    """``value`` for each stage: a number for all alike, or one number per stage."""
    fix = "pass a float for every stage alike or a sequence of length num_stages"
    values: list[object]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [value] * num_stages
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = list(value)
    else:
        raise ConfigError(
            f"{name}: expected a number or {num_stages} numbers (one per stage), "
            f"found {type(value).__name__} {value!r}; {fix}"
        )
    if len(values) != num_stages:
        raise ConfigError(
            f"{name}: expected one number or {num_stages} (one per stage), found {len(values)}; {fix}"
        )
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(
                f"{name}[{i}]: expected a number, found {type(v).__name__} {v!r}; {fix}"
            )
        out.append(float(v))
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ConfigError(f"{name}: expected finite numbers >= 0, found {tuple(out)}; fix the costs")
    return tuple(out)


class Collective(NamedTuple):
    """A collective after the schedule: ``ranks`` take part, it lasts ``duration`` seconds."""

    name: str
    ranks: tuple[int, ...]
    duration: float


class CollectiveSpan(NamedTuple):
    """A :class:`Collective` as it ran: ``[start, end)`` on each of ``ranks``."""

    start: float
    end: float
    ranks: tuple[int, ...]
    name: str


class TimelineEvent(NamedTuple):
    """One action as it ran: ``[start, end)`` in seconds on ``rank``. A RECV
    spans the time the rank waited for its messages."""

    start: float
    end: float
    rank: int
    action: Action


@dataclass(frozen=True)
class Simulation:
    """The simulated run of one training step (all times in seconds, memory in bytes)."""

    schedule: Schedule
    step_time: float
    bubble_fraction: float  # 1 - total busy time / (num_ranks * step_time); collectives count as idle
    busy_time: tuple[float, ...]  # per rank, compute only
    peak_inflight: tuple[int, ...]  # per rank
    memory: tuple[tuple[tuple[float, int], ...], ...]  # per rank: (time, bytes) after each change
    peak_memory: tuple[int, ...]  # per rank
    timeline: tuple[TimelineEvent, ...]  # sorted by start, then end, then rank
    collectives: tuple[CollectiveSpan, ...] = ()  # after the schedule, in order

    @property
    def num_ranks(self) -> int:
        return len(self.busy_time)


def simulate(
    schedule: Schedule,
    *,
    forward: float | Sequence[float],
    input_grad: float | Sequence[float],
    weight_grad: float | Sequence[float],
    comm: float | Sequence[float] = 0.0,
    activation_bytes: float | Sequence[float] | None = None,
    boundaries: Sequence[BoundarySpec] | None = None,
    collectives: Sequence[Collective] = (),
    transfers: Mapping[tuple[int, int], tuple[float, float]] | None = None,
    replay_bytes: float | Sequence[float] | None = None,
    grad_allreduce: float | Sequence[float] | None = None,
    overhead: RuntimeOverhead | None = None,
    backward: float | Sequence[float] | None = None,
) -> Simulation:
    """Simulate ``schedule`` with per-stage costs (a float for every stage alike,
    or one value per stage). ``replay_bytes[s]``: what a recomputing stage's backward
    holds beyond ``activation_bytes`` (the replayed activations), from the start of its
    ``B`` (or ``I``) to the end of its ``B`` (or ``W``). ``boundaries`` as in :func:`~pipec.schedule.lowering.lower`;
    ``collectives`` run after the schedule and ``grad_allreduce`` (seconds per
    stage) from each stage's last backward on (see the module docstring).
    ``transfers[(p, c)] = (forward, backward)``: seconds of a message on the stage
    edge ``p -> c`` and of its gradient back (edges not listed: 0); given, it
    replaces ``comm``. ``overhead``: the runtime's own seconds per action kind and
    per step (see the module docstring); None adds nothing. ``backward``: a ``B``'s
    cost per stage when it is not ``input_grad + weight_grad`` (None: their sum).

    Raises :class:`~pipec.errors.ScheduleError` (with the schedule drawn) when the
    schedule is invalid or deadlocks, :class:`~pipec.errors.ConfigError` for bad costs.
    """
    check_schedule(schedule, "simulate")
    n = schedule.num_stages
    costs = Costs(
        forward=per_stage("forward", forward, n),
        input_grad=per_stage("input_grad", input_grad, n),
        weight_grad=per_stage("weight_grad", weight_grad, n),
        comm=per_stage("comm", comm, n),
        transfers=None if transfers is None else _check_transfers(transfers, n),
        overhead=None if overhead is None else {k: overhead.of_kind(k.value) for k in ActionKind},
        full_backward=None if backward is None else per_stage("backward", backward, n),
    )
    held = per_stage("activation_bytes", 0.0 if activation_bytes is None else activation_bytes, n)
    graph = graph_of(schedule, boundaries)
    check_static(schedule, graph, check_pair_order=False)  # timing does not depend on it
    after = _check_collectives(collectives, schedule.num_ranks)
    overlapped = None if grad_allreduce is None else per_stage("grad_allreduce", grad_allreduce, n)
    run = execute(schedule, graph, costs)
    if not run.finished:
        raise_deadlock(schedule, graph, run)
    replay = per_stage("replay_bytes", 0.0 if replay_bytes is None else replay_bytes, n)
    return _summarise(schedule, run, costs, tuple(round(b) for b in held), after, overlapped,
                      tuple(round(b) for b in replay), 0.0 if overhead is None else overhead.step)


def _check_transfers(
    transfers: Mapping[tuple[int, int], tuple[float, float]], num_stages: int
) -> dict[tuple[int, int, bool], float]:
    out: dict[tuple[int, int, bool], float] = {}
    fix = "pass {(producer_stage, consumer_stage): (forward_seconds, backward_seconds), ...}"
    if not isinstance(transfers, Mapping):
        raise ConfigError(f"transfers: expected a mapping, found {type(transfers).__name__}; {fix}")
    for edge, times in transfers.items():
        ok_edge = (isinstance(edge, tuple) and len(edge) == 2
                   and all(isinstance(s, int) and 0 <= s < num_stages for s in edge))
        ok_times = (isinstance(times, (tuple, list)) and len(times) == 2
                    and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
                            for t in times))
        if not (ok_edge and ok_times):
            raise ConfigError(f"transfers[{edge!r}] = {times!r}: expected stages in 0..{num_stages - 1} and two "
                              f"times >= 0 seconds; {fix}")
        out[(edge[0], edge[1], True)] = float(times[0])
        out[(edge[0], edge[1], False)] = float(times[1])
    return out


def _check_collectives(collectives: Sequence[Collective], num_ranks: int) -> tuple[Collective, ...]:
    out = []
    for i, given in enumerate(collectives):
        try:
            c = Collective(*given)
            ranks = tuple(sorted({int(r) for r in c.ranks}))
            duration = float(c.duration)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"collectives[{i}]: expected (name, ranks, seconds) such as ('all-reduce w', (0, 1), 0.02), "
                f"found {given!r} ({err})"
            ) from None
        c = Collective(str(c.name), ranks, duration)
        if not ranks or ranks[0] < 0 or ranks[-1] >= num_ranks:
            raise ConfigError(
                f"collectives[{i}] ({c.name!r}): expected ranks in 0..{num_ranks - 1}, found {list(c.ranks)}; "
                "name the ranks of the schedule that take part"
            )
        if not math.isfinite(c.duration) or c.duration < 0:
            raise ConfigError(
                f"collectives[{i}] ({c.name!r}): expected a duration of finite seconds >= 0, found {c.duration!r}"
            )
        out.append(c)
    return tuple(out)


def _run_collectives(
    collectives: tuple[Collective, ...], free: list[float]
) -> tuple[CollectiveSpan, ...]:
    """Each collective from when its last rank is free; ``free`` is updated."""
    spans = []
    for c in collectives:
        start = max(free[r] for r in c.ranks)
        end = start + c.duration
        for r in c.ranks:
            free[r] = end
        spans.append(CollectiveSpan(start, end, c.ranks, c.name))
    return tuple(spans)


def _grad_allreduces(
    schedule: Schedule, run: Execution, durations: tuple[float, ...]
) -> tuple[CollectiveSpan, ...]:
    """Each stage's gradient all-reduce from the end of its last backward, one at a
    time per rank (its communication stream), in the order the stages finish."""
    last: dict[int, float] = {}
    for row, times in zip(schedule.actions, run.times):
        for a, (_, _, end) in zip(row, times):
            if a.kind is _K.B or a.kind is _K.I or a.kind is _K.W:
                last[a.stage] = max(last.get(a.stage, 0.0), end)
    stream = [0.0] * schedule.num_ranks
    spans = []
    for stage in sorted(last, key=lambda s: (last[s], s)):
        if durations[stage] <= 0:
            continue
        rank = schedule.rank_of(stage)
        start = max(last[stage], stream[rank])
        stream[rank] = start + durations[stage]
        spans.append(CollectiveSpan(start, stream[rank], (rank,), f"dp all-reduce stage {stage}"))
    return tuple(spans)


def _summarise(
    schedule: Schedule, run: Execution, costs: Costs, held: tuple[int, ...],
    collectives: tuple[Collective, ...] = (), grad_allreduce: tuple[float, ...] | None = None,
    replay: tuple[int, ...] | None = None,
    step_overhead: float = 0.0,
) -> Simulation:
    timeline: list[TimelineEvent] = []
    busy, peaks, memory, peak_memory = [], [], [], []
    for r, (row, times) in enumerate(zip(schedule.actions, run.times)):
        changes: list[tuple[float, int, int, int]] = []  # (time, order, bytes, count)
        total = 0.0
        for a, (reached, start, end) in zip(row, times):
            if a.kind in COMPUTE_KINDS:
                timeline.append(TimelineEvent(start, end, r, a))
                total += end - start
            else:
                timeline.append(TimelineEvent(reached, end, r, a))
            if a.kind is _K.F:
                changes.append((start, 1, held[a.stage], 1))
            elif a.kind is _K.B or a.kind is _K.W:
                changes.append((end, 0, -held[a.stage], -1))  # frees sort before allocations
            extra = replay[a.stage] if replay else 0
            if extra and (a.kind is _K.B or a.kind is _K.I):  # the replay rebuilds the activations
                changes.append((start, 1, extra, 0))
            if extra and (a.kind is _K.B or a.kind is _K.W):
                changes.append((end, 0, -extra, 0))
        busy.append(total)
        changes.sort()
        count = peak_count = num_bytes = peak_bytes = 0
        points: list[tuple[float, int]] = [(0.0, 0)]
        for time, _, delta_bytes, delta_count in changes:
            count += delta_count
            num_bytes += delta_bytes
            peak_count, peak_bytes = max(peak_count, count), max(peak_bytes, num_bytes)
            if points[-1][0] == time:
                points[-1] = (time, num_bytes)
            else:
                points.append((time, num_bytes))
        peaks.append(peak_count)
        memory.append(tuple(points))
        peak_memory.append(peak_bytes)
    timeline.sort()  # by start, then end, then rank
    free = [max((t[2] for t in times), default=0.0) for times in run.times]
    spans = _run_collectives(collectives, free)
    if grad_allreduce is not None:
        spans = _grad_allreduces(schedule, run, grad_allreduce) + spans
    step_time = max([e.end for e in timeline] + [s.end for s in spans], default=0.0) + step_overhead
    capacity = len(busy) * step_time
    return Simulation(
        schedule=schedule,
        step_time=step_time,
        bubble_fraction=1.0 - sum(busy) / capacity if capacity > 0 else 0.0,
        busy_time=tuple(busy),
        peak_inflight=tuple(peaks),
        memory=tuple(memory),
        peak_memory=tuple(peak_memory),
        timeline=tuple(timeline),
        collectives=spans,
    )


def simulate_plan(data: PlanData, backend: str | None = None) -> Simulation:
    """Simulate a plan's lowered schedule for ``backend`` -- the one it stored when
    it was made (:func:`pipec.schedule.backends.plan_lowered`; default NCCL's when
    it has one, else Gloo's) -- under its own per-stage costs (see
    :func:`plan_costs`) and boundary transfers (:func:`plan_transfers`), then the
    tied-gradient all-reduces (:func:`plan_collectives`), with the runtime's own
    overhead per action and step (``data.runtime_overhead``). ``plan.simulate()``."""
    costs, held = plan_costs(data)
    lowered = plan_lowered(data, backend)
    split = split_costs(data)
    return simulate(
        lowered,
        forward=costs.forward,
        input_grad=costs.input_grad,
        weight_grad=[w + x for w, x in zip(costs.weight_grad, split)],
        backward=[i + w for i, w in zip(costs.input_grad, costs.weight_grad)],
        comm=costs.comm,
        activation_bytes=held,
        boundaries=data.boundaries,
        collectives=plan_collectives(data),
        transfers=plan_transfers(data),
        replay_bytes=plan_replay_bytes(data),
        grad_allreduce=plan_grad_allreduce(data),
        overhead=data.runtime_overhead,
    )


def plan_replay_bytes(data: PlanData) -> tuple[float, ...]:
    """Per stage, what its backward holds beyond what it keeps in flight: for a
    recomputing stage the replayed activations, ``sum(saved_bytes) - kept_bytes``
    (:mod:`pipec.costs.recompute`); 0 without recompute."""
    by_index = {st.index: st for st in data.stages}
    out = []
    for s in range(data.num_stages):
        st = by_index[s]
        saved = sum(data.node_costs[n].saved_bytes for n in st.nodes if n in data.node_costs)
        out.append(float(max(0, saved - st.kept_bytes)) if st.recompute != "none" and st.kept_bytes is not None
                   else 0.0)
    return tuple(out)


def plan_grad_allreduce(data: PlanData) -> tuple[float, ...] | None:
    """Per stage, its gradient all-reduce across the plan's ``data_parallel``
    replicas (:attr:`pipec.plan.StageInfo.dp_allreduce_time`); None with one replica."""
    if data.data_parallel < 2:
        return None
    by_index = {st.index: st.dp_allreduce_time for st in data.stages}
    return tuple(by_index[s] for s in range(data.num_stages))


def split_costs(data: PlanData) -> tuple[float, ...]:
    """Per stage, what the runtime adds to a ``W`` for splitting the backward into ``I`` and
    ``W``: ``runtime_overhead.split_per_param_node`` per node of the stage with a weight
    gradient; 0 for a stage that sends no gradient back (its ``W`` is a plain backward)
    and without an overhead."""
    o = data.runtime_overhead
    if o is None or o.split_per_param_node == 0:
        return (0.0,) * data.num_stages
    graph = graph_of(data.schedule, data.boundaries)
    nodes = {st.index: sum(1 for n in st.nodes if n in data.node_costs and data.node_costs[n].weight_grad_time > 0)
             for st in data.stages}
    return tuple(o.split_per_param_node * nodes[s] if graph.backward_producers(s) else 0.0
                 for s in range(data.num_stages))


def plan_transfers(data: PlanData) -> dict[tuple[int, int], tuple[float, float]] | None:
    """Per cross-rank stage edge ``(p, c)``: the seconds of its forward message and
    of its gradient back -- the sum of the boundary transfer times on that edge
    (:attr:`pipec.plan.Boundary.transfer_times`), a gradient only for floating
    tensors. Each transfer counts once. None for a plan saved before boundaries
    carried transfer times (then :func:`plan_costs`' per-stage ``comm``)."""
    if any(not b.transfer_times for b in data.boundaries):
        return None
    out: dict[tuple[int, int], tuple[float, float]] = {}
    for b in data.boundaries:
        for c, t in zip(b.consumer_stages, b.transfer_times):
            forward, backward = out.get((b.producer_stage, c), (0.0, 0.0))
            out[(b.producer_stage, c)] = (forward + t, backward + (t if b.is_floating else 0.0))
    return out


def plan_collectives(data: PlanData) -> tuple[Collective, ...]:
    """The runtime's collectives after each step: one all-reduce per tied group
    among its holders' ranks, in the plan's order (as
    :class:`~pipec.runtime.tied.TiedGradReducer` issues them), lasting the
    group's ``allreduce_time``. Groups whose stages share one rank need none;
    groups of a plan saved before the all-reduce was priced are left out."""
    out = []
    for g in data.tied_groups:
        ranks = g.ranks(data.schedule.rank_of)
        if len(ranks) > 1 and g.allreduce_time is not None:
            out.append(Collective(f"all-reduce {g.fqn}", ranks, g.allreduce_time))
    return tuple(out)


def plan_costs(data: PlanData) -> tuple[Costs, tuple[float, ...]]:
    """Per-stage costs and activation bytes of a plan.

    ``forward`` is ``stage.forward_time``; ``stage.backward_time`` is split into
    ``input_grad`` and ``weight_grad`` in proportion to the sums of
    ``input_grad_time`` and ``weight_grad_time`` of the stage's nodes (all
    ``input_grad`` when both are zero) -- or the stage's own ``input_grad_time``
    and ``weight_grad_time`` when the plan stores them. ``comm`` is for plans
    saved before boundaries carried transfer times (:func:`plan_transfers`):
    ``stage.comm_time`` counts each of the stage's cross-rank messages in both
    directions, so one message on the edge ``s -> c``, or its gradient back,
    costs ``comm_time / (2 x edges)`` of stage ``s``. Activation bytes are what
    the stage's recompute policy keeps per micro-batch in flight (``kept_bytes``),
    or the sum of the nodes' ``saved_bytes`` in plans saved before it was stored.

    A stage that sends no gradient back (none of its inputs carries one: the first
    stage, whose inputs are the micro-batch) has nothing for ``I`` to compute: the
    runtime's ``I`` returns at once and its ``W`` runs the whole backward
    (:func:`pipec.runtime.backward.input_backward`), so its ``input_grad`` is 0 and
    its ``weight_grad`` the whole backward.
    """
    graph = graph_of(data.schedule, data.boundaries)
    node_costs = data.node_costs
    by_index = {st.index: st for st in data.stages}
    forward, input_grad, weight_grad, comm, held = [], [], [], [], []
    for s in range(data.num_stages):
        st = by_index[s]
        nodes = [node_costs[n] for n in st.nodes if n in node_costs]
        ig = sum(c.input_grad_time for c in nodes)
        wg = sum(c.weight_grad_time for c in nodes)
        share = ig / (ig + wg) if ig + wg > 0 else 1.0
        edges = len(graph.remote_producers[s]) + len(graph.remote_consumers[s])
        forward.append(st.forward_time)
        if st.input_grad_time is not None and st.weight_grad_time is not None:
            ig_s, wg_s = st.input_grad_time, st.weight_grad_time
        else:
            ig_s, wg_s = st.backward_time * share, st.backward_time * (1.0 - share)
        if not graph.backward_producers(s):  # no input gradient to compute: W does it all
            ig_s, wg_s = 0.0, ig_s + wg_s
        input_grad.append(ig_s)
        weight_grad.append(wg_s)
        comm.append(st.comm_time / (2 * edges) if edges else 0.0)
        # a recomputing stage keeps less per micro-batch in flight (pipec.costs.recompute)
        held.append(float(sum(c.saved_bytes for c in nodes) if st.kept_bytes is None else st.kept_bytes))
    costs = Costs(tuple(forward), tuple(input_grad), tuple(weight_grad), tuple(comm))
    return costs, tuple(held)
