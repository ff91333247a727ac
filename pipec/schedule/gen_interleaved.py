"""Interleaved 1F1B: several stages ("model chunks") per rank, one step of 1F1B each.

Phase: schedule (generator). Input: sizes. Output: compute-only Schedule.

Megatron-LM, Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", section 2.2.2.
"""

from __future__ import annotations

from pipec.schedule.gen_common import check_sizes, make
from pipec.schedule.ir import Action, B, F, Schedule


def microbatch_groups(num_microbatches: int, num_ranks: int) -> list[range]:
    """Split the micro-batches into consecutive groups of at least ``num_ranks``.

    Megatron runs each chunk over a group of ``num_ranks`` micro-batches before
    moving to the next chunk, which needs ``m`` to be a multiple of ``p``. We
    use ``max(1, m // p)`` groups whose sizes differ by at most one (larger
    first), so any ``m`` works; with ``m < p`` there is one group of ``m``.
    """
    num_groups = max(1, num_microbatches // num_ranks)
    base, extra = divmod(num_microbatches, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


def chunk_orders(num_microbatches: int, num_ranks: int,
                 num_chunks: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (chunk, micro-batch) orders every rank of an interleaved schedule runs its
    forwards and its backwards in: group by group (:func:`microbatch_groups`), chunks
    ascending for the forward and descending for the backward."""
    groups = microbatch_groups(num_microbatches, num_ranks)
    forward_order = [(c, i) for group in groups for c in range(num_chunks) for i in group]
    backward_order = [(c, i) for group in groups for c in reversed(range(num_chunks)) for i in group]
    return forward_order, backward_order


def interleaved_1f1b(num_stages: int, num_microbatches: int, stages_per_rank: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021, section 2.2.2).

    Rank ``k`` holds the ``v = stages_per_rank`` stages ``k, k + p, k + 2p, ...``
    (chunk ``c`` is stage ``c * p + k``). Forwards go group by group of
    micro-batches (see :func:`microbatch_groups`), and within a group chunk by
    chunk; backwards in the same order with the chunks reversed. Rank ``k``
    warms up with ``(v - 1) * g + 2 * (p - 1 - k)`` forwards (``g`` the first
    group's size), then alternates one forward and one backward, then drains.
    p=2, v=2 (4 stages), m=4, one column per unit of time::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17
        rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
        rank 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .

    Step time under uniform costs with ``m`` a multiple of ``p``:
    ``(m * v + p - 1)`` chunk times (a chunk being the F + B of one stage).
    """
    num_ranks = check_sizes("interleaved-1f1b", num_stages, num_microbatches, stages_per_rank)
    p, v = num_ranks, stages_per_rank
    groups = microbatch_groups(num_microbatches, p)
    forward_order, backward_order = chunk_orders(num_microbatches, p, v)
    total = len(forward_order)
    rows: list[list[Action]] = []
    for k in range(p):
        warmup = min((v - 1) * len(groups[0]) + 2 * (p - 1 - k), total)
        row = [F(c * p + k, i) for c, i in forward_order[:warmup]]
        for j in range(total - warmup):
            c, i = forward_order[warmup + j]
            row.append(F(c * p + k, i))
            c, i = backward_order[j]
            row.append(B(c * p + k, i))
        row += [B(c * p + k, i) for c, i in backward_order[total - warmup :]]
        rows.append(row)
    return make("interleaved-1f1b", num_stages, num_microbatches, stages_per_rank, rows)
