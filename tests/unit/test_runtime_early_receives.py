"""Where the executor posts a step's receives ahead (Gloo): before the first receive,
or before the second compute action -- never in front of a rank's first compute."""

from __future__ import annotations

import pytest

from pipec.runtime.comm import BACKWARD, FORWARD
from pipec.runtime.executor import _early_receives
from pipec.schedule.generators import make_schedule
from pipec.schedule.ir import Action, ActionKind
from pipec.schedule.lowering import lower


def _acts(text: str) -> list[Action]:
    return [Action.parse(t) for t in text.split()]


def test_a_rank_that_computes_first_posts_after_its_first_sends() -> None:
    receives, at = _early_receives(_acts("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"))
    assert at == 2  # before 0F1: 0F0 and its send go out first
    assert receives == [(BACKWARD, 0, 0), (BACKWARD, 0, 1)]


def test_a_rank_that_receives_first_posts_at_once() -> None:
    receives, at = _early_receives(_acts("1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1"))
    assert at == 0
    assert receives == [(FORWARD, 1, 0), (FORWARD, 1, 1)]


def test_no_receives_posts_nothing() -> None:
    assert _early_receives(_acts("0F0 0F1 0B1 0B0")) == ([], -1)


@pytest.mark.parametrize("name,spr", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)])
@pytest.mark.parametrize("ranks", [2, 4])
def test_every_receive_of_every_schedule_is_posted_before_it_runs(name: str, spr: int, ranks: int) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "dist"))
    from _handmade import Chain, chain_plan  # a plan of a small chain, as the executor tests use

    stages = ranks * spr
    plan = chain_plan(Chain(stages), make_schedule(name, stages, 8, spr), batch=8,
                      bounds=list(range(stages + 1)), tied=False, lower=False)
    lowered = lower(plan.schedule, plan.boundaries)
    for row in lowered.actions:
        receives, at = _early_receives(row)
        recv_at = [i for i, a in enumerate(row) if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
        assert len(receives) == len(recv_at)
        if not receives:
            assert at == -1
            continue
        assert 0 <= at <= recv_at[0]
        assert sum(1 for a in row[:at] if a.kind.is_compute) <= 1
        assert [(a.stage, a.microbatch) for a in (row[i] for i in recv_at)] == [(s, m) for _, s, m in receives]
