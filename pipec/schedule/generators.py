"""Schedule generators: the order in which each rank runs its forwards and backwards.

Phase: schedule (first pass). Input: ``num_stages``, ``num_microbatches``,
``stages_per_rank``. Output: a compute-only :class:`~pipec.schedule.ir.Schedule`
(F/B/I/W actions; :func:`pipec.schedule.lowering.lower` adds the communication).

Every generator has the same signature ``(num_stages, num_microbatches,
stages_per_rank) -> Schedule`` and is registered under its public name in
:data:`GENERATORS`; :func:`make_schedule` is the one entry point that checks the
arguments. Every generator but the V-shaped ones places stage ``s`` on rank ``s % num_ranks`` (round-robin,
``Schedule.placement``; ask ``Schedule.rank_of``) where ``num_ranks =
num_stages // stages_per_rank``. Within one stage every generator runs the
forwards in micro-batch order and the backwards in micro-batch order, so the
messages between two ranks flow in a predictable order.

The interleaved, zero-bubble and V-shaped generators live in
:mod:`pipec.schedule.gen_interleaved`, :mod:`pipec.schedule.gen_zero_bubble` and
:mod:`pipec.schedule.gen_v` (``zb-v`` and ``dualpipe-v`` place stages in a V,
:func:`~pipec.schedule.ir.v_placement`); ``"synth"`` is made from costs by
:mod:`pipec.schedule.synth`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from pipec.errors import ScheduleError
from pipec.schedule.gen_common import SYNTH, check_sizes, make
from pipec.schedule.gen_interleaved import interleaved_1f1b
from pipec.schedule.gen_v import dualpipe_v, zb_v
from pipec.schedule.gen_zero_bubble import interleaved_zb, zb_h1, zb_h2
from pipec.schedule.ir import B, F, Schedule


def gpipe(num_stages: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """GPipe: every forward, then every backward (Huang et al. 2019, GPipe, section 2.2).

    Rank ``k`` runs ``F0 .. F(m-1)`` then ``B0 .. B(m-1)`` (backwards in
    micro-batch order, as torch.distributed.pipelining does; the step time is the
    same either way). All ``m`` micro-batches are in flight at once. With p=4
    ranks and m=4 micro-batches (one column per unit of time, F and B alike)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13
        rank 0: 0F0 0F1 0F2 0F3 .   .   .   .   .   .   0B0 0B1 0B2 0B3
        rank 1: .   1F0 1F1 1F2 1F3 .   .   .   .   1B0 1B1 1B2 1B3 .
        rank 2: .   .   2F0 2F1 2F2 2F3 .   .   2B0 2B1 2B2 2B3 .   .
        rank 3: .   .   .   3F0 3F1 3F2 3F3 3B0 3B1 3B2 3B3 .   .   .

    Step time under uniform costs: ``(m + p - 1) * (F + B)``.
    """
    num_ranks = check_sizes("gpipe", num_stages, num_microbatches, stages_per_rank)
    m = num_microbatches
    rows = [[F(k, i) for i in range(m)] + [B(k, i) for i in range(m)] for k in range(num_ranks)]
    return make("gpipe", num_stages, m, stages_per_rank, rows)


def one_f_one_b(num_stages: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """1F1B, PipeDream-flush (Narayanan et al. 2021, "Memory-efficient pipeline-parallel
    DNN training", section 2; also Megatron-LM, Narayanan et al. 2021, section 2.2.1).

    Rank ``k`` warms up with ``w = min(p - 1 - k, m)`` forwards, then alternates
    one forward and one backward, then drains the remaining backwards. At most
    ``min(p - k, m)`` micro-batches are in flight on rank ``k``. It runs for any
    ``m >= 1``: with ``m < p`` the early ranks run every forward before their
    first backward, as GPipe does. p=4, m=8 (one column per unit of time)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21
        rank 0: 0F0 0F1 0F2 0F3 .   .   .   0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 .   0B5 .   0B6 .   0B7
        rank 1: .   1F0 1F1 1F2 .   .   1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 .   1B6 .   1B7 .
        rank 2: .   .   2F0 2F1 .   2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 .   2B7 .   .
        rank 3: .   .   .   3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7 .   .   .

    Step time under uniform costs: ``(m + p - 1) * (F + B)``, as GPipe, with
    ``p`` instead of ``m`` activations held.
    """
    num_ranks = check_sizes("1f1b", num_stages, num_microbatches, stages_per_rank)
    m = num_microbatches
    rows = []
    for k in range(num_ranks):
        warmup = min(num_ranks - 1 - k, m)
        row = [F(k, i) for i in range(warmup)]
        for j in range(m - warmup):
            row += [F(k, warmup + j), B(k, j)]
        row += [B(k, j) for j in range(m - warmup, m)]
        rows.append(row)
    return make("1f1b", num_stages, m, stages_per_rank, rows)


Generator = Callable[[int, int, int], Schedule]

GENERATORS: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "interleaved-zb": interleaved_zb,
    "zb-v": zb_v,
    "dualpipe-v": dualpipe_v,
}

#: the schedules a generator makes from sizes alone
FIXED_NAMES: tuple[str, ...] = tuple(GENERATORS)
#: every schedule name :func:`pipec.partition` takes: the fixed ones and ``"synth"``, built at
#: partition time from the split's own costs (:mod:`pipec.schedule.synth`)
SCHEDULE_NAMES: tuple[str, ...] = (*FIXED_NAMES, SYNTH)


def make_schedule(
    name: str, num_stages: int, num_microbatches: int, stages_per_rank: int = 1
) -> Schedule:
    """The compute-only schedule called ``name`` (one of :data:`SCHEDULE_NAMES`).

    Raises :class:`~pipec.errors.ScheduleError` for an unknown name, a count below
    1, ``num_stages`` not divisible by ``stages_per_rank``, ``interleaved-1f1b``
    with one stage per rank, or another schedule with several stages per rank.
    """
    generator = GENERATORS.get(name) if isinstance(name, str) else None
    if name == SYNTH:
        raise ScheduleError(
            "schedule 'synth' is built from a plan's per-stage costs, not from sizes alone: pass "
            "schedule='synth' to pipec.partition, or call pipec.schedule.synth.synthesize(...) with the "
            f"costs; make_schedule takes one of {', '.join(FIXED_NAMES)}"
        )
    if generator is None:
        close = difflib.get_close_matches(str(name).lower().replace("_", "-"), SCHEDULE_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; pass one of these names"
        raise ScheduleError(
            f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULE_NAMES)}{hint}"
        )
    return generator(num_stages, num_microbatches, stages_per_rank)


__all__ = [
    "FIXED_NAMES",
    "GENERATORS",
    "SCHEDULE_NAMES",
    "dualpipe_v",
    "interleaved_zb",
    "gpipe",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "zb_h1",
    "zb_h2",
    "zb_v",
]
