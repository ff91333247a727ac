"""The validator accepts every generator's schedule and catches each kind of mistake."""

from __future__ import annotations

import pytest

from pipec.errors import ScheduleError
from pipec.schedule.gen_common import stage_depths
from pipec.schedule.generators import FIXED_NAMES, make_schedule
from pipec.schedule.ir import Schedule
from pipec.schedule.lowering import lower
from pipec.schedule.validator import validate


def _raises(
    text: str, *fragments: str, boundaries: list[tuple[int, tuple[int, ...]]] | None = None
) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(Schedule.from_text(text, name="case"), boundaries)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("name", FIXED_NAMES)
@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (2, 5), (3, 4), (4, 8)])
def test_generated_schedules_are_valid(name: str, p: int, m: int) -> None:
    v = stage_depths(name, (2,))[0]
    if name == "dualpipe-v" and m < p * v:
        pytest.skip("dualpipe-v needs num_microbatches >= num_stages")
    schedule = make_schedule(name, p * v, m, v)
    validate(schedule)
    validate(lower(schedule))


def test_reordered_schedule_is_caught_with_the_grid_marked() -> None:
    message = _raises(
        "0: 0F0 0F1 0B0 0B1\n1: 1B0 1F0 1F1 1B1\n",
        "rank 1 runs 1B0 (step 0) before 1F0 (step 1)",
        "a backward needs its forward",
    )
    assert "rank 1: [1B0] [1F0] 1F1" in message


def test_reordered_across_ranks_deadlocks() -> None:
    message = _raises(
        "0: 0F0 0B0 0F1 0B1\n1: 1F1 1B1 1F0 1B0\n",
        "deadlock",
        "rank 0 step 1: 0B0 waits for 1B0 (rank 1)",
        "rank 1 step 0: 1F1 waits for 0F1 (rank 0)",
    )
    assert "[0B0]" in message and "[1F1]" in message


def test_missing_action_is_caught() -> None:
    _raises("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 1F1\n", "stage 1 micro-batch 1", "found none")
    _raises("0: 0F0 0B0 0F1 0B1\n1: 1F0 1B0 1B1\n", "lacks 1F1")


def test_backward_must_be_b_or_i_and_w() -> None:
    _raises("0: 0F0 0I0 0B0\n", "expected either 0B0 or both 0I0 and 0W0, found 0B0 0I0")
    _raises("0: 0F0 0I0\n", "found 0I0")
    _raises("0: 0F0 0W0 0I0\n", "W needs the I of the same micro-batch")


def test_duplicate_and_misplaced_actions() -> None:
    _raises("0: 0F0 0F0 0B0\n", "0F0 appears 2 times")
    _raises("0: 0F0 1F0 0B0 1B0\n1:\n", "1F0 belongs on rank 1")
    with pytest.raises(ScheduleError, match="0F3 is out of range"):
        validate(Schedule.from_text("0: 0F0 0B0 0F3 0B3\n", num_microbatches=2))


def test_deadlocking_send_order_is_caught() -> None:
    # rank 0 waits for a gradient before it sends the activation that produces it
    message = _raises(
        "0: 0F0 0RECV_B0 0SEND_F0 0B0\n1: 1RECV_F0 1F0 1B0 1SEND_B0\n",
        "deadlock",
        "0RECV_B0 waits for 1SEND_B0 (rank 1)",
        "1RECV_F0 waits for 0SEND_F0 (rank 0)",
    )
    assert "[0RECV_B0]" in message and "[1RECV_F0]" in message


def test_receives_out_of_send_order_are_caught() -> None:
    _raises(
        "0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1\n"
        "1: 1RECV_F1 1RECV_F0 1F0 1B0 1SEND_B0 1F1 1B1 1SEND_B1\n",
        "rank 0 sends rank 1 message 0->1 F mb0 as message #0",
        "receives 0->1 F mb1 as #0",
    )


def test_comm_actions_must_match_the_transfers() -> None:
    lowered = lower(make_schedule("1f1b", 2, 2)).to_text()
    _raises(lowered.replace("1RECV_F1 ", ""), "rank 1 lacks 1RECV_F1 for 1F1")
    _raises(lowered.replace("0F0 ", "0F0 0RECV_F0 "), "0RECV_F0 moves nothing")
    _raises(
        lowered.replace("0F0 0SEND_F0", "0SEND_F0 0F0"),
        "sends 0SEND_F0 (step 0) before computing 0F0",
    )
    _raises(
        lowered.replace("1RECV_F0 1F0", "1F0 1RECV_F0"), "before receiving its inputs with 1RECV_F0"
    )


def test_skip_boundaries_change_what_is_checked() -> None:
    text = "0: 0F0 0B0\n1: 1F0 1B0\n2: 2F0 2B0\n"
    validate(Schedule.from_text(text))
    skip = [(0, (1, 2)), (1, (2,))]
    validate(Schedule.from_text(text), skip)
    lowered = lower(Schedule.from_text(text), skip)
    assert lowered.actions[0] == Schedule.from_text("0: 0F0 0SEND_F0 0RECV_B0 0B0").actions[0]
    validate(lowered, skip)
    with pytest.raises(ScheduleError, match="rank 1 lacks 1SEND_F0 for 1F0"):
        validate(lower(Schedule.from_text(text), [(0, (1,))]), skip)


def test_wrong_sizes() -> None:
    with pytest.raises(ScheduleError, match="stages_per_rank"):
        validate(Schedule.from_text("0: 0F0 0B0\n1: 1F0 1B0\n", num_stages=3))
