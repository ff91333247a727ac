"""Validator: check a schedule before any process runs it.

Phase: schedule (after generation or lowering). Input: a
:class:`~pipec.schedule.ir.Schedule`, compute-only or lowered, and optionally
the boundaries it was lowered with. Output: ``None``, or
:class:`~pipec.errors.ScheduleError` whose message draws the schedule as a grid
with the offending actions in brackets.

Checks, in order:

1. shape: ``num_stages`` a multiple of the number of ranks, every action's stage
   and micro-batch in range and on its rank (stage ``s`` on rank ``schedule.rank_of(s)``, the placement);
2. completeness: per stage and micro-batch exactly one ``F``, and either one
   ``B`` or one ``I`` and one ``W``;
3. order on one rank: ``F`` after the ``F`` of its producer stages on the same
   rank, a backward after its own ``F`` and after the backwards of its consumer
   stages on the same rank, ``W`` after ``I``;
4. lowered schedules: every cross-rank transfer has exactly one SEND and one
   RECV, a SEND comes after the compute it sends, a RECV before the compute
   that needs it, and for every ordered pair of ranks the messages are received
   in the order they are sent (the semantics of :mod:`pipec.schedule.lowering`);
5. a dry run (:func:`pipec.schedule.dry_run.execute`): asynchronous sends,
   blocking receives, and the cross-rank compute dependencies (through the
   messages, or instantaneous when the schedule is compute-only). A rank that
   can never go on is a deadlock.

Dry run and grid follow torch.distributed.pipelining's schedule validator and
simulator (``_validate_schedule``, ``_simulate_comms_compute``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NoReturn

from pipec.errors import ScheduleError
from pipec.schedule.dry_run import Execution, execute, unit_costs
from pipec.schedule.grid import index_columns, schedule_grid
from pipec.schedule.ir import Action, ActionKind, Schedule, check_schedule
from pipec.schedule.stage_graph import (
    COMPUTE_KINDS,
    RECV_KINDS,
    SEND_KINDS,
    BoundarySpec,
    Message,
    StageGraph,
    graph_of,
)

_K = ActionKind
Position = tuple[int, int]  # (rank, index into that rank's actions)


def validate(
    schedule: Schedule,
    boundaries: Sequence[BoundarySpec] | None = None,
    *,
    check_pair_order: bool = True,
) -> None:
    """Raise :class:`~pipec.errors.ScheduleError` unless ``schedule`` is complete,
    ordered, matched and deadlock-free (see the module docstring).
    ``check_pair_order=False`` skips the per-pair message order (check 4's last
    part), for schedules lowered with ``match_pair_order=False`` for Gloo."""
    check_schedule(schedule, "validate")
    _check_shape(schedule)
    graph = graph_of(schedule, boundaries)
    check_static(schedule, graph, check_pair_order=check_pair_order)
    run = execute(schedule, graph, unit_costs(schedule.num_stages))
    if not run.finished:
        raise_deadlock(schedule, graph, run)


def _fail(
    schedule: Schedule, problem: str, marks: Iterable[Position], *, by_index: bool
) -> NoReturn:
    columns = index_columns(schedule) if by_index else None
    grid = schedule_grid(schedule, marks=list(marks), columns=columns, window=40)
    raise ScheduleError(
        f"schedule {schedule.name!r} is invalid: {problem}\n\n{grid}"
        "([x] marks the offending actions; columns are "
        f"{'action indices' if by_index else 'time steps of a dry run'})"
    )


def check_static(schedule: Schedule, graph: StageGraph, *, check_pair_order: bool = True) -> None:
    """Checks 1-4 of the module docstring (everything but the dry run)."""
    _check_shape(schedule)
    where = _positions(schedule)
    _check_complete(schedule, where)
    _check_local_order(schedule, graph, where)
    if schedule.is_lowered:
        _check_comm(schedule, graph, where)
        if check_pair_order:
            _check_pair_order(schedule, graph)


def _check_shape(schedule: Schedule) -> None:
    ranks, n, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    if ranks < 1 or n < 1 or m < 1 or n % ranks or schedule.stages_per_rank != n // ranks:
        raise ScheduleError(
            f"schedule {schedule.name!r}: expected num_stages ({n}) = stages_per_rank "
            f"({schedule.stages_per_rank}) x number of ranks ({ranks}) and num_microbatches >= 1 "
            f"(found {m}); fix the sizes or the number of rank rows"
        )
    if len(schedule.placement) != n or any(not 0 <= r < ranks for r in schedule.placement):
        raise ScheduleError(
            f"schedule {schedule.name!r}: its placement {list(schedule.placement)} must give each of the "
            f"{n} stages a rank in 0..{ranks - 1}; fix the placement or the number of rank rows"
        )
    for r, row in enumerate(schedule.actions):
        for i, a in enumerate(row):
            if not (0 <= a.stage < n and 0 <= a.microbatch < m):
                _fail(
                    schedule,
                    f"rank {r} step {i}: {a} is out of range (num_stages={n}, "
                    f"num_microbatches={m}); remove it or fix the sizes",
                    [(r, i)],
                    by_index=True,
                )
            if schedule.rank_of(a.stage) != r:
                _fail(
                    schedule,
                    f"rank {r} step {i}: {a} belongs on rank {schedule.rank_of(a.stage)} "
                    f"(the schedule's placement {list(schedule.placement)}); move it there",
                    [(r, i)],
                    by_index=True,
                )


def _positions(schedule: Schedule) -> dict[Action, list[Position]]:
    where: dict[Action, list[Position]] = {}
    for r, row in enumerate(schedule.actions):
        for i, a in enumerate(row):
            where.setdefault(a, []).append((r, i))
    return where


def _check_complete(schedule: Schedule, where: dict[Action, list[Position]]) -> None:
    for a, places in where.items():
        if len(places) > 1:
            _fail(
                schedule,
                f"{a} appears {len(places)} times; every action runs once, remove the copies",
                places,
                by_index=True,
            )
    for s in range(schedule.num_stages):
        rank = schedule.rank_of(s)
        for m in range(schedule.num_microbatches):
            has = {k for k in (_K.F, _K.B, _K.I, _K.W) if Action(s, k, m) in where}
            if _K.F not in has:
                _fail(
                    schedule,
                    f"rank {rank} lacks {Action(s, _K.F, m)}; add the forward of "
                    f"stage {s} for micro-batch {m}",
                    [],
                    by_index=True,
                )
            backward = has - {_K.F}
            if backward not in ({_K.B}, {_K.I, _K.W}):
                found = " ".join(str(Action(s, k, m)) for k in sorted(backward)) or "none"
                marks = [p for k in backward for p in where[Action(s, k, m)]]
                _fail(
                    schedule,
                    f"stage {s} micro-batch {m} on rank {rank}: expected either "
                    f"{s}B{m} or both {s}I{m} and {s}W{m}, found {found}; add or remove "
                    "backward actions",
                    marks,
                    by_index=True,
                )


def _input_grad(where: dict[Action, list[Position]], s: int, m: int) -> Position:
    full = where.get(Action(s, _K.B, m))
    return (full or where[Action(s, _K.I, m)])[0]


def _check_local_order(
    schedule: Schedule, graph: StageGraph, where: dict[Action, list[Position]]
) -> None:
    def need(a: Action, at: Position, before: Position, why: str) -> None:
        if before[0] == at[0] and before[1] > at[1]:
            earlier = schedule.actions[before[0]][before[1]]
            _fail(
                schedule,
                f"rank {at[0]} runs {a} (step {at[1]}) before {earlier} (step "
                f"{before[1]}), but {why}; swap them",
                [at, before],
                by_index=True,
            )

    for a, (at, *_) in where.items():
        s, m = a.stage, a.microbatch
        if a.kind is _K.F:
            for p in graph.producers[s]:
                need(a, at, where[Action(p, _K.F, m)][0], f"stage {s} reads stage {p}'s output")
        elif a.kind in (_K.B, _K.I):
            need(a, at, where[Action(s, _K.F, m)][0], "a backward needs its forward")
            for c in graph.consumers[s]:
                need(a, at, _input_grad(where, c, m), f"stage {s} needs stage {c}'s input gradient")
        elif a.kind is _K.W:
            need(a, at, where[Action(s, _K.I, m)][0], "W needs the I of the same micro-batch")


def _check_comm(schedule: Schedule, graph: StageGraph, where: dict[Action, list[Position]]) -> None:
    needed: dict[Action, Position] = {}  # comm action -> position of its compute
    for a, (at, *_) in where.items():
        recv, send = graph.comm_around(a) if a.kind in COMPUTE_KINDS else (None, None)
        for c in (recv, send):
            if c is not None:
                needed[c] = at
    for a, (at, *_) in where.items():
        if a.kind not in COMPUTE_KINDS and a not in needed:
            _fail(
                schedule,
                f"rank {at[0]} step {at[1]}: {a} moves nothing (no cross-rank "
                "transfer of that stage and direction exists); remove it",
                [at],
                by_index=True,
            )
    for c, compute_at in needed.items():
        places = where.get(c)
        compute = schedule.actions[compute_at[0]][compute_at[1]]
        if not places:
            _fail(
                schedule,
                f"rank {compute_at[0]} lacks {c} for {compute}; lower the "
                "compute-only schedule with pipec.schedule.lowering.lower",
                [compute_at],
                by_index=True,
            )
        at = places[0]
        if c.kind in SEND_KINDS and at[1] < compute_at[1]:
            _fail(
                schedule,
                f"rank {at[0]} sends {c} (step {at[1]}) before computing {compute} "
                f"(step {compute_at[1]}); move the send after it",
                [at, compute_at],
                by_index=True,
            )
        if c.kind in RECV_KINDS and at[1] > compute_at[1]:
            _fail(
                schedule,
                f"rank {at[0]} runs {compute} (step {compute_at[1]}) before receiving "
                f"its inputs with {c} (step {at[1]}); move the receive before it",
                [at, compute_at],
                by_index=True,
            )


def _check_pair_order(schedule: Schedule, graph: StageGraph) -> None:
    sent: dict[tuple[int, int], list[tuple[Message, Position]]] = {}
    got: dict[tuple[int, int], list[tuple[Message, Position]]] = {}
    for r, row in enumerate(schedule.actions):
        for i, a in enumerate(row):
            for msg in graph.messages(a):
                if a.kind in SEND_KINDS:
                    sent.setdefault((r, graph.rank_of(msg.dst_stage)), []).append((msg, (r, i)))
                else:
                    got.setdefault((graph.rank_of(msg.src_stage), r), []).append((msg, (r, i)))
    for (src, dst), sends in sorted(sent.items()):
        for k, ((msg, at), (recv_msg, recv_at)) in enumerate(zip(sends, got.get((src, dst), []))):
            if msg != recv_msg:
                _fail(
                    schedule,
                    f"rank {src} sends rank {dst} message {msg} as message #{k} "
                    f"between them, but rank {dst} receives {recv_msg} as #{k}; NCCL pairs "
                    "sends and receives in order, so reorder the receives (or sends) to "
                    "match",
                    [at, recv_at],
                    by_index=True,
                )


def raise_deadlock(schedule: Schedule, graph: StageGraph, run: Execution) -> NoReturn:
    """Raise the ScheduleError that explains where the dry run ``run`` got stuck."""
    present = {a for row in schedule.actions for a in row}

    def name(w: Action) -> str:
        # the engine files "input gradient done" under I; show the B the schedule has
        full = Action(w.stage, _K.B, w.microbatch)
        return str(full if w.kind is _K.I and full in present else w)

    lines = []
    for b in run.blocked:
        waits = (
            ", ".join(f"{name(w)} (rank {graph.rank_of(w.stage)})" for w in b.waiting_for)
            or "nothing it can name"
        )
        lines.append(f"rank {b.rank} step {b.step}: {b.action} waits for {waits}")
    _fail(
        schedule,
        "deadlock: every rank left waits for an action that cannot happen\n  "
        + "\n  ".join(lines)
        + "\nreorder the actions so each wait is met (a RECV needs its SEND posted first)",
        [(b.rank, b.step) for b in run.blocked],
        by_index=False,
    )
