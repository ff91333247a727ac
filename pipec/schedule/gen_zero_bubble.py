"""ZB-H1: 1F1B with the backward split into input-gradient (I) and weight-gradient (W).

Phase: schedule (generator). Input: sizes. Output: compute-only Schedule.

Qi et al. 2023, "Zero Bubble Pipeline Parallelism" (ICLR 2024), section 3.1
(handcrafted schedule ZB-H1).
"""

from __future__ import annotations

from pipec.schedule.gen_common import check_sizes, make
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
