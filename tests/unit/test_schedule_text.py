"""The text form round-trips, for generated and arbitrary schedules."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipec.schedule.gen_common import V_SHAPED, accepts_depth
from pipec.schedule.generators import FIXED_NAMES, make_schedule
from pipec.schedule.ir import Action, ActionKind, Schedule
from pipec.schedule.lowering import lower


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    num_ranks = draw(st.integers(1, 4))
    stages_per_rank = draw(st.integers(1, 3))
    num_stages = num_ranks * stages_per_rank
    num_microbatches = draw(st.integers(1, 6))
    action = st.builds(
        Action,
        st.integers(0, num_stages - 1),
        st.sampled_from(list(ActionKind)),
        st.integers(0, num_microbatches - 1),
    )
    rows = draw(st.lists(st.lists(action, max_size=12), min_size=num_ranks, max_size=num_ranks))
    return Schedule(
        name="random",
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        stages_per_rank=stages_per_rank,
        actions=tuple(tuple(r) for r in rows),
    )


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_text_round_trip(schedule: Schedule) -> None:
    back = Schedule.from_text(
        schedule.to_text(),
        name=schedule.name,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        stages_per_rank=schedule.stages_per_rank,
    )
    assert back == schedule
    assert Schedule.model_validate_json(schedule.model_dump_json()) == schedule


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(FIXED_NAMES),
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(2, 3),
    st.booleans(),
)
def test_generated_schedules_round_trip_with_inferred_sizes(
    name: str, num_ranks: int, num_microbatches: int, v: int, lowered: bool
) -> None:
    stages_per_rank = v if accepts_depth(name, v) else 2 if accepts_depth(name, 2) else 1
    num_stages = num_ranks * stages_per_rank
    assume(name != "dualpipe-v" or num_microbatches >= num_stages)
    schedule = make_schedule(name, num_stages, num_microbatches, stages_per_rank)
    if lowered:
        schedule = lower(schedule)
    # the text holds the actions; a placement other than round-robin (the V) is given with it
    placement = schedule.placement if name in V_SHAPED else None
    back = Schedule.from_text(schedule.to_text(), name=name, placement=placement)
    assert back == schedule
