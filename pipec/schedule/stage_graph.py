"""The stage graph: which stage feeds which, where each stage runs, what is a message.

Phase: schedule library (shared by lowering, the dry run, the validator and the
simulator). Input: ``num_stages``, ``num_ranks``, the placement (stage -> rank,
:attr:`pipec.schedule.ir.Schedule.placement`; default round-robin) and optionally the plan's
boundaries (``producer_stage -> consumer_stages``; default: stage ``s`` feeds
``s + 1``). Output: a :class:`StageGraph` -- producers and consumers of each
stage, the ones on other ranks, and the :class:`Message` each cross-rank
transfer is (see :mod:`pipec.schedule.lowering` for the semantics).

Gradients flow back only along edges with a tensor that :func:`carries_grad`
(a floating-point tensor; not a bool/int mask): the one predicate lowering,
the dry run and the runtime (:mod:`pipec.runtime.routing`) share, so an edge
made only of masks has forward messages and no backward ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action, ActionKind, Schedule, round_robin_placement


class BoundaryLike(Protocol):
    """Anything with the stage fields of :class:`pipec.plan.Boundary`."""

    @property
    def producer_stage(self) -> int: ...

    @property
    def consumer_stages(self) -> tuple[int, ...]: ...


BoundarySpec = BoundaryLike | tuple[int, Sequence[int]]


def carries_grad(boundary: BoundarySpec, requires_grad: Mapping[str, bool] | None = None) -> bool:
    """Whether a gradient flows back through ``boundary`` from its consumers to its producer.

    The one predicate of backward messages: lowering inserts ``SEND_B``/``RECV_B``
    only for edges with such a tensor, and the runtime sends and receives the
    gradients of exactly those (:func:`pipec.runtime.routing.build_routes`).
    A ``(producer, consumers)`` pair carries one; a plan boundary
    (:class:`pipec.plan.Boundary`) does when it is floating point
    (``is_floating``: no gradient for bool/int masks or indices) and
    ``requires_grad`` (the stage modules' analysis, by boundary name; absent: True)
    does not say False. The runtime passes ``requires_grad``; the schedule does
    not, so a floating tensor that depends on no trainable parameter keeps its
    (empty) backward message in the schedule: the runtime then sends nothing
    and receives nothing for it, which never changes any message order.
    """
    if isinstance(boundary, tuple):
        return True
    if not bool(getattr(boundary, "is_floating", True)):
        return False
    name = getattr(boundary, "name", None)
    return requires_grad is None or name is None or bool(requires_grad.get(name, True))

COMPUTE_KINDS = frozenset({ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W})
SEND_KINDS = frozenset({ActionKind.SEND_F, ActionKind.SEND_B})
RECV_KINDS = frozenset({ActionKind.RECV_F, ActionKind.RECV_B})


class Message(NamedTuple):
    """What ``src_stage`` sends ``dst_stage`` for one micro-batch; ``forward`` is
    False for gradients flowing back."""

    src_stage: int
    dst_stage: int
    forward: bool
    microbatch: int

    def __str__(self) -> str:
        kind = "F" if self.forward else "B"
        return f"{self.src_stage}->{self.dst_stage} {kind} mb{self.microbatch}"


def message_order(peer_stage: int, boundary_index: int) -> tuple[int, int]:
    """Sort key of the tensors one SEND/RECV action moves: per peer stage ascending
    (the order of :meth:`StageGraph.messages`, which lowering matches per pair of
    ranks), then per boundary in plan order. The one rule NCCL relies on: the
    runtime's P2P sends and receives in this order (:mod:`pipec.runtime.comm`)."""
    return (peer_stage, boundary_index)


@dataclass(frozen=True)
class StageGraph:
    """Which stage feeds which, and which of those edges cross ranks."""

    num_stages: int
    num_ranks: int
    producers: tuple[tuple[int, ...], ...]
    consumers: tuple[tuple[int, ...], ...]
    remote_producers: tuple[tuple[int, ...], ...]
    remote_consumers: tuple[tuple[int, ...], ...]
    placement: tuple[int, ...] = ()
    #: per stage, the producers/consumers whose edge carries a gradient
    #: (:func:`carries_grad`); empty: all of them (a graph built by hand)
    grad_producers: tuple[tuple[int, ...], ...] = ()
    grad_consumers: tuple[tuple[int, ...], ...] = ()
    _memo: dict[Action, tuple[Message, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def rank_of(self, stage: int) -> int:
        """The rank that runs ``stage`` (the schedule's placement)."""
        return self.placement[stage]

    def backward_producers(self, stage: int) -> tuple[int, ...]:
        """The producers of ``stage`` that a gradient flows back to."""
        return self.grad_producers[stage] if self.grad_producers else self.producers[stage]

    def backward_consumers(self, stage: int) -> tuple[int, ...]:
        """The consumers of ``stage`` that send it a gradient back."""
        return self.grad_consumers[stage] if self.grad_consumers else self.consumers[stage]

    def remote_backward_producers(self, stage: int) -> tuple[int, ...]:
        """:meth:`backward_producers` on other ranks: the peers of ``sSEND_Bm``."""
        return tuple(p for p in self.backward_producers(stage) if p in self.remote_producers[stage])

    def remote_backward_consumers(self, stage: int) -> tuple[int, ...]:
        """:meth:`backward_consumers` on other ranks: the peers of ``sRECV_Bm``."""
        return tuple(c for c in self.backward_consumers(stage) if c in self.remote_consumers[stage])

    def messages(self, action: Action) -> tuple[Message, ...]:
        """The messages a communication action moves, in order ( () for compute):
        by peer stage ascending (:func:`message_order`)."""
        found = self._memo.get(action)
        if found is None:
            found = self._memo[action] = self._messages(action)
        return found

    def _messages(self, action: Action) -> tuple[Message, ...]:
        s, m = action.stage, action.microbatch
        kind = action.kind
        if kind is ActionKind.SEND_F:
            return tuple(Message(s, c, True, m) for c in self.remote_consumers[s])
        if kind is ActionKind.RECV_F:
            return tuple(Message(p, s, True, m) for p in self.remote_producers[s])
        if kind is ActionKind.SEND_B:
            return tuple(Message(s, p, False, m) for p in self.remote_backward_producers(s))
        if kind is ActionKind.RECV_B:
            return tuple(Message(c, s, False, m) for c in self.remote_backward_consumers(s))
        return ()

    def comm_around(self, action: Action) -> tuple[Action | None, Action | None]:
        """The (receive before, send after) a compute action needs, if any."""
        s, m = action.stage, action.microbatch
        if action.kind is ActionKind.F:
            recv = ActionKind.RECV_F if self.remote_producers[s] else None
            send = ActionKind.SEND_F if self.remote_consumers[s] else None
        elif action.kind in (ActionKind.B, ActionKind.I):
            recv = ActionKind.RECV_B if self.remote_backward_consumers(s) else None
            send = ActionKind.SEND_B if self.remote_backward_producers(s) else None
        else:
            return None, None
        return (
            Action(s, recv, m) if recv else None,
            Action(s, send, m) if send else None,
        )


def graph_of(schedule: Schedule, boundaries: Sequence[BoundarySpec] | None = None) -> StageGraph:
    """The stage graph of ``schedule`` (its sizes and placement) over ``boundaries``."""
    return stage_graph(schedule.num_stages, schedule.num_ranks, boundaries, placement=schedule.placement)


def stage_graph(
    num_stages: int,
    num_ranks: int,
    boundaries: Sequence[BoundarySpec] | None = None,
    *,
    placement: Sequence[int] | None = None,
) -> StageGraph:
    """The stage graph of ``boundaries`` (default: a chain ``s -> s + 1``), with
    stage ``s`` on rank ``placement[s]`` (default round-robin).

    ``boundaries`` holds :class:`pipec.plan.Boundary` values or plain
    ``(producer_stage, consumer_stages)`` pairs; several boundaries between the
    same two stages make one edge, which carries a gradient back when any of
    them does (:func:`carries_grad`).
    """
    edges: set[tuple[int, int]] = set()
    grad_edges: set[tuple[int, int]] = set()
    if boundaries is None:
        edges = {(s, s + 1) for s in range(num_stages - 1)}
        grad_edges = set(edges)
    for b in boundaries or ():
        if isinstance(b, tuple):
            producer, consumers = b[0], tuple(b[1])
        else:
            producer, consumers = b.producer_stage, tuple(b.consumer_stages)
        for c in consumers:
            if not 0 <= producer < c < num_stages:
                raise ScheduleError(
                    f"boundary {producer} -> {c}: expected 0 <= producer_stage < consumer_stage "
                    f"< num_stages={num_stages}; a stage can only feed a later stage"
                )
            edges.add((producer, c))
            if carries_grad(b):
                grad_edges.add((producer, c))
    producers: list[list[int]] = [[] for _ in range(num_stages)]
    consumers_of: list[list[int]] = [[] for _ in range(num_stages)]
    for p, c in sorted(edges):  # peers ascending: the message order (message_order)
        producers[c].append(p)
        consumers_of[p].append(c)

    where = tuple(placement) if placement else round_robin_placement(num_stages, num_ranks)
    if len(where) != num_stages or any(not 0 <= r < num_ranks for r in where):
        raise ScheduleError(
            f"placement {list(where)}: expected one rank in 0..{num_ranks - 1} per stage "
            f"({num_stages} stages); give each stage the rank that runs it"
        )

    def remote(stage: int, peers: list[int]) -> tuple[int, ...]:
        return tuple(q for q in peers if where[q] != where[stage])

    return StageGraph(
        num_stages=num_stages,
        num_ranks=num_ranks,
        producers=tuple(tuple(x) for x in producers),
        consumers=tuple(tuple(x) for x in consumers_of),
        remote_producers=tuple(remote(s, x) for s, x in enumerate(producers)),
        remote_consumers=tuple(remote(s, x) for s, x in enumerate(consumers_of)),
        placement=where,
        grad_producers=tuple(tuple(p for p in x if (p, c) in grad_edges) for c, x in enumerate(producers)),
        grad_consumers=tuple(tuple(c for c in x if (p, c) in grad_edges) for p, x in enumerate(consumers_of)),
    )


__all__ = [
    "COMPUTE_KINDS",
    "RECV_KINDS",
    "SEND_KINDS",
    "BoundaryLike",
    "BoundarySpec",
    "Message",
    "StageGraph",
    "carries_grad",
    "graph_of",
    "message_order",
    "stage_graph",
]
