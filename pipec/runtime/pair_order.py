"""The order in which each peer rank sends this rank its messages (for NCCL).

Phase: stage runtime (pure; no communication). Inputs: every rank's lowered
actions (the plan's stored lowering: all ranks run the same one), this rank's
number and its incoming messages per local stage (:class:`pipec.runtime.comm.P2P`'s
receive lists: boundary name and peer stage, already filtered to the tensors that
carry a gradient for the backward direction, by the same predicate the sender
uses). Output: per source rank, the list of :data:`Incoming` keys in the order
that rank issues the sends, for one training step and for one forward-only step.

Why: NCCL ignores tags and pairs a rank pair's sends and receives in issue
order. One RECV action takes every message of one stage and micro-batch; with
several stages per rank and tensors that skip stages, the sender can interleave
those messages with others that later RECVs take, and no order of whole RECV
actions matches it (the lowering error of issue #13). The runtime therefore
receives at message granularity: when an action needs a message, it first posts
the receives of every message the same peer sent before it (into their own
buffers, for the actions that read them later). Posting those early never adds
waiting: each was sent before the message the rank is about to wait for, so it
arrives no later, and nothing is left pending on the pair once that wait ends.
The order rule mirrors the sender's (:func:`pipec.schedule.stage_graph.message_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from pipec.schedule.ir import Action, ActionKind
from pipec.schedule.stage_graph import message_order

FORWARD, BACKWARD = 0, 1  # as pipec.runtime.comm

#: (direction, local stage, boundary name, peer stage, micro-batch): one incoming message
Incoming = tuple[int, int, str, int, int]


def incoming_order(
    rows: Sequence[Sequence[Action]],
    rank: int,
    *,
    recv_forward: Mapping[int, Sequence[tuple[str, int]]],
    recv_backward: Mapping[int, Sequence[tuple[str, int]]],
    boundary_index: Mapping[str, int],
    keep: Callable[[Action], bool] = lambda a: True,
) -> dict[int, list[Incoming]]:
    """``{source rank: incoming messages in its send order}`` over the actions of
    ``rows`` that ``keep`` selects (the forward-only step keeps F, SEND_F and RECV_F).

    ``recv_forward[c]`` lists ``(name, producer stage)`` that local stage ``c``
    receives; ``recv_backward[p]`` lists ``(name, consumer stage)`` whose gradient
    local stage ``p`` receives. A sender's SEND of stage ``s`` sends them ordered
    by (local stage, boundary index), as its own P2P sorts them."""
    forward_from = _by_sender(recv_forward, boundary_index)
    backward_from = _by_sender(recv_backward, boundary_index)
    out: dict[int, list[Incoming]] = {}
    for src, row in enumerate(rows):
        if src == rank:
            continue
        seq: list[Incoming] = []
        for a in row:
            if not keep(a):
                continue
            if a.kind is ActionKind.SEND_F:
                seq += [(FORWARD, c, name, a.stage, a.microbatch) for c, name in forward_from.get(a.stage, ())]
            elif a.kind is ActionKind.SEND_B:
                seq += [(BACKWARD, p, name, a.stage, a.microbatch) for p, name in backward_from.get(a.stage, ())]
        if seq:
            out[src] = seq
    return out


def _by_sender(
    incoming: Mapping[int, Sequence[tuple[str, int]]], boundary_index: Mapping[str, int]
) -> dict[int, list[tuple[int, str]]]:
    """``{sender stage: [(local stage, name), ...]}`` in the sender's message order."""
    out: dict[int, list[tuple[int, str]]] = {}
    for local, msgs in incoming.items():
        for name, peer in msgs:
            out.setdefault(peer, []).append((local, name))
    for order in out.values():
        order.sort(key=lambda x: message_order(x[0], boundary_index[x[1]]))
    return out


__all__ = ["Incoming", "incoming_order"]
