"""Generators: expected schedules as literal text, and the argument checks."""

from __future__ import annotations

import pytest

from pipec.errors import ScheduleError
from pipec.schedule.gen_common import accepts_depth
from pipec.schedule.gen_interleaved import microbatch_groups
from pipec.schedule.generators import FIXED_NAMES, make_schedule
from pipec.schedule.ir import ActionKind, Schedule

ONE_F_ONE_B_P2_M4 = """
0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3
"""

ONE_F_ONE_B_P4_M8 = """
0: 0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7
1: 1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7
2: 2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7
3: 3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7
"""

ONE_F_ONE_B_P4_M2 = """
0: 0F0 0F1 0B0 0B1
1: 1F0 1F1 1B0 1B1
2: 2F0 2F1 2B0 2B1
3: 3F0 3B0 3F1 3B1
"""

GPIPE_P2_M3 = """
0: 0F0 0F1 0F2 0B0 0B1 0B2
1: 1F0 1F1 1F2 1B0 1B1 1B2
"""

INTERLEAVED_P2_V2_M4 = """
0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3
"""

ZB_H1_P2_M4 = """
0: 0F0 0F1 0I0 0W0 0F2 0I1 0W1 0F3 0I2 0W2 0I3 0W3
1: 1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3
"""


@pytest.mark.parametrize(
    ("name", "num_stages", "num_microbatches", "stages_per_rank", "expected"),
    [
        ("1f1b", 2, 4, 1, ONE_F_ONE_B_P2_M4),
        ("1f1b", 4, 8, 1, ONE_F_ONE_B_P4_M8),
        ("1f1b", 4, 2, 1, ONE_F_ONE_B_P4_M2),
        ("gpipe", 2, 3, 1, GPIPE_P2_M3),
        ("interleaved-1f1b", 4, 4, 2, INTERLEAVED_P2_V2_M4),
        ("zb-h1", 2, 4, 1, ZB_H1_P2_M4),
    ],
)
def test_expected_schedule(
    name: str, num_stages: int, num_microbatches: int, stages_per_rank: int, expected: str
) -> None:
    schedule = make_schedule(name, num_stages, num_microbatches, stages_per_rank)
    assert schedule.to_text() == expected.lstrip("\n")
    assert schedule.name == name
    assert (schedule.num_stages, schedule.num_microbatches) == (num_stages, num_microbatches)
    assert schedule.stages_per_rank == stages_per_rank
    assert not schedule.is_lowered


@pytest.mark.parametrize("name", FIXED_NAMES)
def test_every_action_once_on_its_rank(name: str) -> None:
    v = 1 if accepts_depth(name, 1) else 2
    m = 6  # dualpipe-v needs m >= num_stages
    schedule = make_schedule(name, 3 * v, m, v)
    seen = [a for row in schedule.actions for a in row]
    assert len(seen) == len(set(seen))
    for rank, row in enumerate(schedule.actions):
        assert all(schedule.rank_of(a.stage) == rank for a in row)
    # every (stage, micro-batch): one F and either one B or one I and one W
    for s in range(3 * v):
        for i in range(m):
            kinds = sorted(a.kind.value for a in seen if a.stage == s and a.microbatch == i)
            assert kinds in (["B", "F"], ["F", "I", "W"]), (s, i, kinds)
    split = {a.kind for a in seen} >= {ActionKind.I, ActionKind.W}
    assert split == (name not in ("gpipe", "1f1b", "interleaved-1f1b"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("pipedream", 4, 8, 1), "unknown schedule 'pipedream'"),
        (("1F1B", 4, 8, 1), "did you mean '1f1b'"),
        (("1f1b", 0, 8, 1), "num_stages must be an integer >= 1, found 0"),
        (("gpipe", 4, 0, 1), "num_microbatches must be an integer >= 1"),
        (("gpipe", 4, 2, 0), "stages_per_rank must be an integer >= 1"),
        (("1f1b", 4, 8, 2), "use 'interleaved-1f1b'"),
        (("zb-h1", 4, 8, 2), "runs one stage per rank"),
        (("interleaved-1f1b", 4, 8, 1), "needs stages_per_rank >= 2"),
        (("interleaved-1f1b", 6, 8, 4), "not divisible by stages_per_rank=4"),
        (("1f1b", True, 8, 1), "found True"),
    ],
)
def test_invalid_arguments_raise_with_the_fix(
    args: tuple[str, int, int, int], fragment: str
) -> None:
    with pytest.raises(ScheduleError) as info:
        make_schedule(*args)
    assert fragment in str(info.value)


def test_schedule_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        make_schedule("gpipe", -1, 2)


def test_one_f_one_b_with_fewer_microbatches_than_ranks_runs() -> None:
    schedule = make_schedule("1f1b", 8, 3)
    assert schedule.actions[0][:3] == Schedule.from_text("0: 0F0 0F1 0F2").actions[0]


@pytest.mark.parametrize(
    ("num_microbatches", "num_ranks", "sizes"),
    [(8, 4, [4, 4]), (9, 4, [5, 4]), (6, 4, [6]), (3, 4, [3]), (11, 2, [3, 2, 2, 2, 2])],
)
def test_microbatch_groups(num_microbatches: int, num_ranks: int, sizes: list[int]) -> None:
    groups = microbatch_groups(num_microbatches, num_ranks)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(num_microbatches))
