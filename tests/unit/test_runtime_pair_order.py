"""Each peer's send order, as a receiver on NCCL follows it (pipec.runtime.pair_order).

Four stages interleaved on two ranks, stage 0's tensor ``a`` read by stages 1
and 3 (a skip), ``b`` from 1 to 2 and ``c`` from 2 to 3: rank 0 sends ``a`` to
stage 1 and to stage 3 for micro-batch 0 before ``a`` to stage 1 for
micro-batch 1, which is why no order of whole RECV actions on rank 1 can match
it (3RECV_F0 also needs ``c``, sent later) and the runtime receives per message.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.runtime.pair_order import BACKWARD, FORWARD, incoming_order
from pipec.schedule.generators import make_schedule
from pipec.schedule.ir import Action, ActionKind
from pipec.schedule.lowering import lower

BOUNDARIES = [(0, [1, 3]), (1, [2]), (2, [3])]
INDEX = {"a": 0, "b": 1, "c": 2}
# what each rank receives per local stage: (boundary, peer stage)
RANK1_FORWARD = {1: [("a", 0)], 3: [("c", 2), ("a", 0)]}
RANK1_BACKWARD = {1: [("b", 2)]}


def _rows() -> Sequence[Sequence[Action]]:
    lowered = lower(make_schedule("interleaved-1f1b", 4, 2, 2), BOUNDARIES, match_pair_order=False)
    assert str(lowered).splitlines()[0].startswith("0: 0F0 0SEND_F0 0F1 0SEND_F1 2RECV_F0 2F0 2SEND_F0")
    return lowered.actions


def test_rank_1_receives_rank_0s_messages_in_its_send_order() -> None:
    got = incoming_order(_rows(), 1, recv_forward=RANK1_FORWARD, recv_backward=RANK1_BACKWARD, boundary_index=INDEX)
    assert got == {0: [
        (FORWARD, 1, "a", 0, 0), (FORWARD, 3, "a", 0, 0),  # 0SEND_F0: stage 1 first (peer stage order)
        (FORWARD, 1, "a", 0, 1), (FORWARD, 3, "a", 0, 1),  # 0SEND_F1
        (FORWARD, 3, "c", 2, 0), (FORWARD, 3, "c", 2, 1),  # 2SEND_F0, 2SEND_F1
        (BACKWARD, 1, "b", 2, 0), (BACKWARD, 1, "b", 2, 1),  # 2SEND_B0, 2SEND_B1
    ]}


def test_a_forward_only_step_keeps_the_forward_sends_and_a_rank_gets_nothing_from_itself() -> None:
    forward = {ActionKind.F, ActionKind.SEND_F, ActionKind.RECV_F}
    got = incoming_order(_rows(), 1, recv_forward=RANK1_FORWARD, recv_backward=RANK1_BACKWARD, boundary_index=INDEX,
                         keep=lambda a: a.kind in forward)
    assert [k[0] for k in got[0]] == [FORWARD] * 6 and 1 not in got
