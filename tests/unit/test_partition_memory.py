"""Micro-batches in flight per stage, from schedule text and from the generators."""

from __future__ import annotations

import pytest

from pipec.schedule.in_flight import in_flight_formula, in_flight_from_schedule
from pipec.schedule.ir import Schedule


def test_counts_from_schedule_text() -> None:
    gpipe = Schedule.from_text("0: 0F0 0F1 0F2 0B0 0B1 0B2\n1: 1F0 1F1 1F2 1B0 1B1 1B2\n")
    assert in_flight_from_schedule(gpipe) == (3, 3)
    one_f = Schedule.from_text("0: 0F0 0F1 0B0 0F2 0B1 0B2\n1: 1F0 1B0 1F1 1B1 1F2 1B2\n")
    assert in_flight_from_schedule(one_f) == (2, 1)


def test_split_backward_holds_until_the_weight_pass() -> None:
    zb = Schedule.from_text("0: 0F0 0F1 0I0 0F2 0I1 0W0 0I2 0W1 0W2\n")
    assert in_flight_from_schedule(zb) == (3,)  # F0 F1 F2 all before W0


@pytest.mark.parametrize(("stages", "microbatches"), [(4, 8), (4, 2), (3, 3), (1, 5)])
def test_closed_forms_of_the_generated_schedules(stages: int, microbatches: int) -> None:
    assert in_flight_formula("gpipe", stages, stages, microbatches) == (microbatches,) * stages
    assert in_flight_formula("1f1b", stages, stages, microbatches) == tuple(
        min(stages - k, microbatches) for k in range(stages))
    assert in_flight_formula("zb-h1", stages, stages, microbatches) == (min(stages, microbatches),) * stages


def test_interleaved_counts_follow_the_warmup() -> None:
    # p = 2 ranks, v = 2 chunks, m = 4 (groups of 2): rank 0 runs 0F0 0F1 2F0 2F1 0F2 2B0 0F3 ...,
    # so stage 0 holds micro-batches 0-3 before its first backward, stage 2 at most two
    assert in_flight_formula("interleaved-1f1b", 4, 2, 4) == (4, 3, 2, 1)


def test_unknown_schedule_falls_back_to_every_micro_batch() -> None:
    assert in_flight_formula("my-schedule", 3, 3, 5) == (5, 5, 5)
