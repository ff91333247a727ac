"""Lowering: insert the communication a compute-only schedule needs.

Phase: schedule (the pass after a generator). Input: a compute-only
:class:`~pipec.schedule.ir.Schedule` and, optionally, the plan's boundaries
(``producer_stage -> consumer_stages``; default: stage ``s`` feeds ``s + 1``).
Output: the same compute order with SEND/RECV actions added. The executor of
``pipec.runtime`` interprets exactly these semantics:

``sSEND_Fm`` on rank(s), right after ``sFm``
    sends every forward output of stage ``s`` for micro-batch ``m`` to each
    consumer stage on another rank. Consumers on the same rank read it locally.
``sRECV_Fm`` on rank(s), before ``sFm``
    receives every forward input of stage ``s`` for ``m`` that comes from a
    producer stage on another rank.
``sSEND_Bm`` on rank(s), right after the backward that makes the input
    gradients of stage ``s`` for ``m`` (``B``, or ``I`` when split)
    sends those gradients to the producer stages on other ranks.
``sRECV_Bm`` on rank(s), before the backward (``B`` or ``I``) of ``s`` for ``m``
    receives the gradients of its outputs from the consumer stages on other ranks.

An action is emitted only where a cross-rank transfer exists (no ``RECV_F`` on
stage 0, no communication between two stages of the same rank). Skip tensors go
straight from producer to consumer, never relayed. One *message* is everything
one stage sends one other stage for one micro-batch in one direction; within an
action messages go in ascending order of the peer stage (the runtime's routing
follows the same order).

Sends are asynchronous (``isend``); a receive blocks until its send has been
posted. SENDs go right after their compute. RECVs start right before the
compute that needs them and are pulled earlier where needed so that, for every
ordered pair of ranks, the messages are received in the order they are sent
(NCCL matches point-to-point operations per pair in issue order). Pulling a
receive earlier never adds waiting: the message it receives was posted before
the one the rank was about to wait for. With one stage per rank, or a chain of
stages, that always suffices. With several stages per rank and skip tensors
between them, one RECV may have to take messages that the sender interleaves
with others; lowering then delays the offending SEND past later sends (a send
never blocks its sender), dry-runs the result, and raises
:class:`~pipec.errors.ScheduleError` if no deadlock-free order is found.
Whole actions cannot always be ordered so (a tensor that skips stages across
interleaved stages); :mod:`pipec.schedule.backends` then lowers with
``match_pair_order=False`` and the runtime keeps each pair's order per message
(:mod:`pipec.runtime.pair_order`).

Backward messages exist only for tensors that carry a gradient
(:func:`~pipec.schedule.stage_graph.carries_grad`): a bool mask read by a later
stage has a ``SEND_F``/``RECV_F`` and no ``SEND_B``/``RECV_B``.

Lowering an already-lowered schedule returns it unchanged (lowering is
idempotent); call ``schedule.compute_only()`` first to lower it afresh.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.errors import ScheduleError
from pipec.schedule.dry_run import execute, unit_costs
from pipec.schedule.ir import Action, Schedule, check_schedule
from pipec.schedule.stage_graph import (
    RECV_KINDS,
    SEND_KINDS,
    BoundarySpec,
    Message,
    StageGraph,
    graph_of,
)
from pipec.schedule.validator import raise_deadlock


def lower(
    schedule: Schedule,
    boundaries: Sequence[BoundarySpec] | None = None,
    *,
    match_pair_order: bool = True,
) -> Schedule:
    """Insert SEND_F/RECV_F/SEND_B/RECV_B for every boundary that crosses ranks.

    Returns an already-lowered schedule unchanged. ``match_pair_order=False``
    leaves every RECV right before its compute without matching the send order
    per pair of ranks: only for backends that match messages by tag (Gloo),
    never for NCCL. Raises :class:`~pipec.errors.ScheduleError` for an action on
    the wrong rank or out of range, or messages that cannot be received in the
    order they are sent.
    """
    check_schedule(schedule, "lower")
    if schedule.is_lowered:
        return schedule
    graph = graph_of(schedule, boundaries)
    rows: list[list[Action]] = []
    for rank, row in enumerate(schedule.actions):
        out: list[Action] = []
        for action in row:
            if not 0 <= action.stage < schedule.num_stages or graph.rank_of(action.stage) != rank:
                raise ScheduleError(
                    f"cannot lower schedule {schedule.name!r}: rank {rank} holds {action}, but "
                    f"stage {action.stage} runs on rank {graph.rank_of(action.stage) if 0 <= action.stage < schedule.num_stages else None} of "
                    f"{schedule.num_ranks} (num_stages={schedule.num_stages}); fix the schedule "
                    f"(pipec.validate explains)"
                )
            recv, send = graph.comm_around(action)
            out += [a for a in (recv, action, send) if a is not None]
        rows.append(out)
    if not match_pair_order:
        return schedule.model_copy(update={"actions": tuple(tuple(r) for r in rows)})
    first: _OrderConflict | None = None  # the first conflict, to explain a failure
    matched: list[list[Action]] | None = None
    for _ in range(_MAX_DELAYS):
        try:
            matched = match_receive_order(rows, graph)
            break
        except _OrderConflict as conflict:
            first = first or conflict
            if not _delay_send(rows[conflict.src_rank], graph, conflict):
                break
    if matched is None:
        raise ScheduleError(str(first))
    lowered = schedule.model_copy(update={"actions": tuple(tuple(r) for r in matched)})
    if first is not None or matched != rows:
        _check_deadlock_free(lowered, graph, first)
    return lowered


_MAX_DELAYS = 256  # each try is one O(actions) pass; only skips across chunks need any


class _OrderConflict(ScheduleError):
    """``dst_rank`` must receive ``msg`` before ``earlier``, which ``src_rank`` sends first."""

    def __init__(self, text: str, src_rank: int, earlier: Message, msg: Message) -> None:
        super().__init__(text)
        self.src_rank, self.earlier, self.msg = src_rank, earlier, msg


def _delay_send(row: list[Action], graph: StageGraph, conflict: _OrderConflict) -> bool:
    """Move the SEND of ``conflict.earlier`` right after the SEND of ``conflict.msg``
    (sends are asynchronous, so the sender never waits for it); False if impossible."""
    blocks = {
        msg: i for i, a in enumerate(row) if a.kind in SEND_KINDS for msg in graph.messages(a)
    }
    i, j = blocks[conflict.earlier], blocks[conflict.msg]
    if j <= i:
        return False
    row.insert(j, row.pop(i))
    return True


def _check_deadlock_free(
    lowered: Schedule, graph: StageGraph, conflict: _OrderConflict | None
) -> None:
    """Dry-run a lowered schedule whose receives or sends were moved."""
    run = execute(lowered, graph, unit_costs(lowered.num_stages))
    if run.finished:
        return
    if conflict is not None:
        raise ScheduleError(f"{conflict} (delaying the sends to fix the order would deadlock)")
    raise_deadlock(lowered, graph, run)


def match_receive_order(rows: Sequence[Sequence[Action]], graph: StageGraph) -> list[list[Action]]:
    """Reorder each rank's RECVs so every pair of ranks receives in send order.

    A RECV is pulled earlier (never later), together with the RECVs that must
    precede it, so it still comes before the compute that needs it.
    """
    sent: dict[tuple[int, int], list[Message]] = {}
    for rank, row in enumerate(rows):
        for a in row:
            if a.kind in SEND_KINDS:
                for msg in graph.messages(a):
                    sent.setdefault((rank, graph.rank_of(msg.dst_stage)), []).append(msg)
    position = {msg: i for seq in sent.values() for i, msg in enumerate(seq)}
    out = []
    for rank, row in enumerate(rows):
        if _receives_in_send_order(rank, row, graph, sent):
            out.append(list(row))
            continue
        order = _ReceiveOrder(rank, graph, sent, position, row)
        for a in row:
            if a.kind not in RECV_KINDS:
                order.row.append(a)
            elif a not in order.done:
                order.emit(a)
        out.append(order.row)
    return out


def _receives_in_send_order(
    rank: int, row: Sequence[Action], graph: StageGraph, sent: dict[tuple[int, int], list[Message]]
) -> bool:
    """Whether ``rank`` already receives from every peer exactly in send order."""
    got: dict[int, list[Message]] = {}
    for a in row:
        if a.kind in RECV_KINDS:
            for msg in graph.messages(a):
                got.setdefault(graph.rank_of(msg.src_stage), []).append(msg)
    peers = {src for src, dst in sent if dst == rank} | set(got)
    return all(got.get(src, []) == sent.get((src, rank), []) for src in peers)


class _ReceiveOrder:
    """One rank's new action list, built while receiving in each sender's order."""

    def __init__(
        self,
        rank: int,
        graph: StageGraph,
        sent: dict[tuple[int, int], list[Message]],
        position: dict[Message, int],
        row: Sequence[Action],
    ) -> None:
        self.rank, self.graph, self.sent, self.position = rank, graph, sent, position
        self.receives = {a: graph.messages(a) for a in row if a.kind in RECV_KINDS}
        self.block_of = {msg: a for a, msgs in self.receives.items() for msg in msgs}
        for msg in self.block_of:
            if msg not in position:
                raise ScheduleError(
                    f"rank {rank} expects message {msg} but rank "
                    f"{graph.rank_of(msg.src_stage)} never sends it; the schedule lacks the "
                    f"compute that produces it (pipec.validate explains)"
                )
        self.received: dict[int, int] = {}  # source rank -> messages received so far
        self.row: list[Action] = []
        self.done: set[Action] = set()

    def emit(self, target: Action) -> None:
        """Append ``target`` after the RECVs whose messages are sent before its own."""
        stack, on_stack = [target], {target}
        while stack:
            top = stack[-1]
            blocker = self._first_blocker(top, on_stack)
            if blocker is not None:
                stack.append(blocker)
                on_stack.add(blocker)
                continue
            for msg in self.receives[top]:
                src = self.graph.rank_of(msg.src_stage)
                self.received[src] = self.received.get(src, 0) + 1
            self.row.append(top)
            self.done.add(top)
            stack.pop()
            on_stack.discard(top)

    def _first_blocker(self, top: Action, on_stack: set[Action]) -> Action | None:
        """The RECV that must come before ``top``, or None when ``top`` can go now."""
        local: dict[int, int] = {}
        for msg in self.receives[top]:
            src = self.graph.rank_of(msg.src_stage)
            cur = local.get(src, self.received.get(src, 0))
            if cur == self.position[msg]:
                local[src] = cur + 1
                continue
            earlier = self.sent[(src, self.rank)][cur]
            blocker = self.block_of.get(earlier)
            if blocker is None:
                raise ScheduleError(
                    f"rank {src} sends rank {self.rank} message {earlier}, but no receive on "
                    f"rank {self.rank} expects it; the schedule lacks the compute that needs it "
                    f"(pipec.validate explains)"
                )
            if blocker == top or blocker in on_stack:
                raise _OrderConflict(
                    f"rank {self.rank} cannot receive in send order: {top} needs message {msg}, "
                    f"but rank {src} sends {earlier} before it, which {blocker} receives. One "
                    f"action per stage and micro-batch cannot receive messages the sender "
                    f"interleaves with others; lower with match_pair_order=False (as "
                    f"pipec.schedule.backends does) and keep the order per message at run time",
                    src,
                    earlier,
                    msg,
                )
            return blocker
        return None
