"""Zero-bubble schedules: the backward split into input-gradient (I) and weight-gradient (W).

Phase: schedule (generator). Input: sizes. Output: compute-only Schedule.

Qi et al. 2023, "Zero Bubble Pipeline Parallelism" (ICLR 2024), section 3.1
(handcrafted schedules ZB-H1 and ZB-H2) and its interleaved ZB-1p.
"""

from __future__ import annotations

from pipec.schedule.gen_common import check_sizes, make
from pipec.schedule.gen_interleaved import chunk_orders, microbatch_groups
from pipec.schedule.ir import Action, F, I, Schedule, W


def zb_h1(num_stages: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 3.1).

    Only the input-gradient pass ``I`` lies on the critical path between ranks;
    the weight-gradient pass ``W`` of the same stage and micro-batch can run any
    time later. Rank ``k`` runs 1F1B with ``I`` in place of ``B`` (warm-up of
    ``min(p - 1 - k, m)`` forwards) and follows its ``n``-th ``I`` with the
    ``W`` of micro-batch ``n - k``: the later the rank, the more ``W`` passes
    it keeps back, and the deferred ones fill the drain at the end, where 1F1B
    idles. p=4, m=6 (one column per unit of time, F = I = W)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20
        rank 0: 0F0 0F1 0F2 0F3 .   .   .   0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0I3 0W3 0I4 0W4 0I5 0W5
        rank 1: .   1F0 1F1 1F2 .   .   1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1I4 1W3 1I5 1W4 1W5
        rank 2: .   .   2F0 2F1 .   2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2I5 2W3 2W4 2W5
        rank 3: .   .   .   3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3W3 3W4 3W5

    With ``F = I = W`` and ``m >= p`` the step time is ``m (F + I + W) +
    (p - 1)(F + I - W)``, a third of 1F1B's bubble. Counting a micro-batch as in
    flight until its ``W`` ends, every rank peaks at ``min(p, m)``, 1F1B's
    largest peak (rank 0); later ranks hold more than under 1F1B, but only the
    smaller state ``W`` needs (the paper's point, section 3.1).
    """
    num_ranks = check_sizes("zb-h1", num_stages, num_microbatches, stages_per_rank)
    m = num_microbatches
    rows: list[list[Action]] = []
    for k in range(num_ranks):
        warmup = min(num_ranks - 1 - k, m)
        row = [F(k, i) for i in range(warmup)]
        weights_done = 0
        for j in range(m):
            if j < m - warmup:
                row.append(F(k, warmup + j))
            row.append(I(k, j))
            if j >= k:  # rank k keeps k weight passes back
                row.append(W(k, weights_done))
                weights_done += 1
        row += [W(k, i) for i in range(weights_done, m)]
        rows.append(row)
    return make("zb-h1", num_stages, m, stages_per_rank, rows)


def zb_h2(num_stages: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """ZB-H2 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 3.1, Figure 3).

    ZB-H1 with more memory: rank ``k`` warms up with ``w = min(2(p - 1 - k) + 1, m)``
    forwards -- as many as fit before its first input gradient can arrive, so the
    start of the pipeline has no idle slot after the first forward -- then repeats
    ``I F W`` (an input gradient, the next forward, the oldest weight gradient)
    while forwards remain; as in ZB-H1, rank ``k`` keeps ``k`` weight gradients
    back for the drain, where they fill the wait for the last input gradients
    (``I`` is on the critical path between ranks, ``W`` is not). p=4, m=8 (one
    column per unit of time, F = I = W)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24  25  26
        rank 0: 0F0 0F1 0F2 0F3 0F4 0F5 0F6 0I0 0F7 0W0 0I1 0W1 0I2 0W2 .   0I3 0W3 0I4 0W4 .   0I5 0W5 0I6 0W6 .   0I7 0W7
        rank 1: .   1F0 1F1 1F2 1F3 1F4 1I0 1F5 1I1 1F6 1W0 1I2 1F7 1W1 1I3 1W2 1I4 1W3 .   1I5 1W4 1I6 1W5 .   1I7 1W6 1W7
        rank 2: .   .   2F0 2F1 2F2 2I0 2F3 2I1 2F4 2I2 2F5 2W0 2I3 2F6 2W1 2I4 2F7 2W2 2I5 2W3 2I6 2W4 .   2I7 2W5 2W6 2W7
        rank 3: .   .   .   3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3F4 3W0 3I4 3F5 3W1 3I5 3F6 3W2 3I6 3F7 3W3 3I7 3W4 3W5 3W6 3W7

    Bubble: with ``F = I = W = c`` the step time is ``3mc + (p - 1)c`` for every
    ``m >= 1`` -- each rank idles ``(p - 1)c``, the time the first forward needs
    to reach the last rank, which no schedule avoids. The paper's
    ``(p - 1)(T_F + T_B - 2T_W)`` is 0 here because it leaves that fill out;
    pipec's ZB-H2 reaches the fill alone, as ZB-H1 does at equal costs
    (ZB-H1: ``(p - 1)(F + I - W)``, 1F1B ``(p - 1)(F + I + W)``), and its
    larger warm-up pays off when ``F`` is larger than ``W``.
    Peak activations on rank ``k`` (``m >= 2p``): ``2p - k`` micro-batches --
    ``2p`` on rank 0 (the paper's ``2p - 1`` plus the one forward this order
    runs before the first ``W``); with ``m <= p``: ``m`` on every rank.
    """
    num_ranks = check_sizes("zb-h2", num_stages, num_microbatches, stages_per_rank)
    m = num_microbatches
    rows: list[list[Action]] = []
    for k in range(num_ranks):
        warmup = min(2 * (num_ranks - 1 - k) + 1, m)
        row = [F(k, i) for i in range(warmup)]
        weights_done = 0
        for j in range(m):
            row.append(I(k, j))
            if j < m - warmup:
                row.append(F(k, warmup + j))
            if j >= k:  # as ZB-H1, rank k keeps k weight passes back for the drain
                row.append(W(k, weights_done))
                weights_done += 1
        row += [W(k, i) for i in range(weights_done, m)]
        rows.append(row)
    return make("zb-h2", num_stages, m, stages_per_rank, rows)


def interleaved_zb(num_stages: int, num_microbatches: int, stages_per_rank: int) -> Schedule:
    """Interleaved zero bubble, ZB1P with several stages per rank (Qi et al. 2023,
    "Zero Bubble Pipeline Parallelism", section 3.1 and Appendix (interleaved ZB-1p);
    torch.distributed.pipelining's ``ScheduleInterleavedZeroBubble``).

    Interleaved 1F1B's order (:func:`pipec.schedule.gen_interleaved.interleaved_1f1b`:
    rank ``k`` holds stages ``k, k + p, ...``, micro-batches in groups, forwards
    chunk by chunk, backwards with the chunks reversed) with the backward split:
    rank ``k`` warms up with ``(v - 1) g + (p - 1 - k)`` forwards (one per hop, not
    two: only ``I`` has to come back), alternates ``F`` and ``I``, and, as ZB-H1,
    follows each ``I`` with the oldest pending ``W`` once it has ``k`` of them
    back; the rest drain at the end. p=2, v=2 (4 stages), m=4 (one column per
    unit of time, F = I = W)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
        rank 0: 0F0 0F1 2F0 2F1 .   2I0 2W0 0F2 2I1 2W1 0F3 0I0 0W0 2F2 0I1 0W1 2F3 2I2 2W2 2I3 2W3 0I2 0W2 0I3 0W3
        rank 1: .   1F0 1F1 3F0 3I0 3F1 3I1 3W0 1F2 1I0 3W1 1F3 1I1 1W0 3F2 3I2 1W1 3F3 3I3 3W2 1I2 3W3 1I3 1W2 1W3

    Bubble: with ``F = I = W = c`` per stage the step time is ``3vmc + (p - 1)c``
    (``m >= p``) -- each rank idles ``(p - 1)c``, a third of interleaved 1F1B's
    ``3(p - 1)c``, as ZB-H1's ``(p - 1)(F + I - W)`` is of 1F1B's; the
    simulator checks it in tests/unit/test_schedule_v.py. Peak activations:
    ``v p`` stage micro-batches on every rank (``m >= p``), interleaved 1F1B's
    largest (rank 0's).
    """
    num_ranks = check_sizes("interleaved-zb", num_stages, num_microbatches, stages_per_rank)
    p, v = num_ranks, stages_per_rank
    groups = microbatch_groups(num_microbatches, p)
    forward_order, backward_order = chunk_orders(num_microbatches, p, v)
    total = len(forward_order)
    rows: list[list[Action]] = []
    for k in range(p):
        warmup = min((v - 1) * len(groups[0]) + (p - 1 - k), total)
        row = [F(c * p + k, i) for c, i in forward_order[:warmup]]
        weights_done = 0
        for j in range(total):
            if j < total - warmup:
                c, i = forward_order[warmup + j]
                row.append(F(c * p + k, i))
            c, i = backward_order[j]
            row.append(I(c * p + k, i))
            if j >= k:
                c, i = backward_order[weights_done]
                row.append(W(c * p + k, i))
                weights_done += 1
        row += [W(c * p + k, i) for c, i in backward_order[weights_done:]]
        rows.append(row)
    return make("interleaved-zb", num_stages, num_microbatches, stages_per_rank, rows)
