"""Lowering adds exactly the transfers that cross ranks and never deadlocks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipec.errors import ScheduleError
from pipec.schedule.gen_common import stage_depths
from pipec.schedule.generators import FIXED_NAMES, make_schedule
from pipec.schedule.ir import ActionKind, Schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import simulate
from pipec.schedule.stage_graph import SEND_KINDS, graph_of
from pipec.schedule.validator import validate

Edges = list[tuple[int, tuple[int, ...]]]

LOWERED_1F1B_P2_M2 = """
0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1
1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1
"""


def skip_patterns(num_stages: int) -> dict[str, Edges]:
    chain = [(s, (s + 1,)) for s in range(num_stages - 1)]
    rnd = random.Random(num_stages)
    return {
        "chain": chain,
        "skip2": [
            (s, tuple(c for c in (s + 1, s + 2) if c < num_stages)) for s in range(num_stages - 1)
        ],
        "from-first": [(0, tuple(range(1, num_stages)))] + chain[1:],
        "all-pairs": [(s, tuple(range(s + 1, num_stages))) for s in range(num_stages - 1)],
        "random": chain
        + [
            (a, (b,))
            for a in range(num_stages)
            for b in range(a + 2, num_stages)
            if rnd.random() < 0.4
        ],
    }


def check_lowered(schedule: Schedule, lowered: Schedule, boundaries: Edges | None) -> None:
    validate(lowered, boundaries)
    assert lowered.compute_only() == schedule
    graph = graph_of(schedule, boundaries)
    for row in lowered.actions:
        for a in row:
            if a.kind.is_comm:
                assert graph.messages(a), f"{a} moves nothing"
                assert all(
                    graph.rank_of(m.src_stage) != graph.rank_of(m.dst_stage)
                    for m in graph.messages(a)
                )


@pytest.mark.parametrize("name", FIXED_NAMES)
@pytest.mark.parametrize(("p", "m"), [(1, 3), (2, 1), (2, 4), (3, 2), (3, 5), (4, 4), (4, 9)])
def test_every_generator_lowers_to_a_valid_schedule(name: str, p: int, m: int) -> None:
    for v in stage_depths(name, (2, 3)):
        if name == "dualpipe-v" and m < p * v:
            continue  # it needs m >= num_stages
        schedule = make_schedule(name, p * v, m, v)
        check_lowered(schedule, lower(schedule), None)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "zb-h2"])
@pytest.mark.parametrize(("p", "m"), [(2, 3), (3, 1), (3, 4), (4, 2), (4, 8)])
@pytest.mark.parametrize("pattern", ["skip2", "from-first", "all-pairs", "random"])
def test_skip_boundaries_go_straight_to_their_consumer(
    name: str, p: int, m: int, pattern: str
) -> None:
    schedule = make_schedule(name, p, m)
    boundaries = skip_patterns(p)[pattern]
    lowered = lower(schedule, boundaries)
    check_lowered(schedule, lowered, boundaries)
    if pattern == "from-first":  # stage 0 feeds every stage: one send reaches them all
        assert sum(a.kind is ActionKind.SEND_F for a in lowered.actions[0]) == m


@pytest.mark.parametrize(("p", "v"), [(2, 2), (2, 3), (3, 2), (4, 2), (4, 3)])
@pytest.mark.parametrize("m", [1, 3, 4, 8])
def test_interleaved_with_skips_inside_a_chunk(p: int, v: int, m: int) -> None:
    num_stages = p * v
    boundaries = [(s, (s + 1,)) for s in range(num_stages - 1)]
    boundaries += [(c * p, (c * p + p - 1,)) for c in range(v) if p > 2]
    schedule = make_schedule("interleaved-1f1b", num_stages, m, v)
    check_lowered(schedule, lower(schedule, boundaries), boundaries)


@pytest.mark.parametrize("pattern", ["skip2", "from-first", "all-pairs", "random"])
def test_interleaved_with_skips_across_chunks_lowers_or_explains(pattern: str) -> None:
    # one action per stage and micro-batch cannot always receive messages the
    # sender interleaves with others; lowering then says so instead of emitting
    # a schedule that would hang under NCCL
    for p, v, m in [(2, 2, 4), (3, 2, 4), (2, 3, 1), (4, 2, 8)]:
        schedule = make_schedule("interleaved-1f1b", p * v, m, v)
        boundaries = skip_patterns(p * v)[pattern]
        try:
            lowered = lower(schedule, boundaries)
        except ScheduleError as error:
            assert "cannot receive in send order" in str(error)
            continue
        check_lowered(schedule, lowered, boundaries)


def test_expected_lowered_text() -> None:
    lowered = lower(make_schedule("1f1b", 2, 2))
    assert lowered.to_text() == LOWERED_1F1B_P2_M2.lstrip("\n")


def test_only_cross_rank_transfers_get_actions() -> None:
    lowered = lower(make_schedule("interleaved-1f1b", 4, 2, 4))  # one rank holds every stage
    assert not lowered.is_lowered
    lowered = lower(make_schedule("1f1b", 3, 2))
    kinds_by_stage = [{a.kind for a in row if a.kind.is_comm} for row in lowered.actions]
    assert kinds_by_stage[0] == {ActionKind.SEND_F, ActionKind.RECV_B}
    assert kinds_by_stage[1] == {
        ActionKind.RECV_F,
        ActionKind.SEND_F,
        ActionKind.RECV_B,
        ActionKind.SEND_B,
    }
    assert kinds_by_stage[2] == {ActionKind.RECV_F, ActionKind.SEND_B}


def test_sends_follow_their_compute_and_backward_sends_follow_i() -> None:
    lowered = lower(make_schedule("zb-h1", 3, 4))
    for row in lowered.actions:
        for prev, a in zip(row, row[1:]):
            if a.kind in SEND_KINDS:
                expected = ActionKind.F if a.kind is ActionKind.SEND_F else ActionKind.I
                assert (prev.stage, prev.kind, prev.microbatch) == (a.stage, expected, a.microbatch)


def test_lowering_a_lowered_schedule_returns_it_unchanged() -> None:
    lowered = lower(make_schedule("1f1b", 4, 8))
    assert lower(lowered) is lowered
    assert lower(lowered.compute_only()) == lowered


def test_plan_boundaries_are_accepted() -> None:
    from pipec.plan import Boundary

    boundaries = [
        Boundary(
            name="h",
            producer_stage=0,
            consumer_stages=(1,),
            shape=(2, 3),
            dtype="float32",
            num_bytes=24,
        ),
        Boundary(
            name="mask",
            producer_stage=0,
            consumer_stages=(2,),
            shape=(2,),
            dtype="bool",
            num_bytes=2,
        ),
        Boundary(
            name="h2",
            producer_stage=1,
            consumer_stages=(2,),
            shape=(2, 3),
            dtype="float32",
            num_bytes=24,
        ),
    ]
    schedule = make_schedule("1f1b", 3, 3)
    check_lowered(schedule, lower(schedule, boundaries), [(0, (1, 2)), (1, (2,))])


@pytest.mark.parametrize("bad", [[(1, (0,))], [(0, (0,))], [(0, (5,))], [(-1, (1,))]])
def test_bad_boundaries_are_rejected(bad: Edges) -> None:
    with pytest.raises(ScheduleError, match="expected 0 <= producer_stage < consumer_stage"):
        lower(make_schedule("1f1b", 3, 2), bad)


def test_action_on_the_wrong_rank_is_rejected() -> None:
    with pytest.raises(ScheduleError, match="stage 1 runs on rank 1"):
        lower(Schedule.from_text("0: 0F0 1F0 1B0 0B0\n1:\n"))


def test_lowered_and_implicit_communication_time_alike() -> None:
    # one stage per rank on a chain: a RECV right before its compute is exactly
    # the implicit model, so both simulations agree, latency included
    for name in ("gpipe", "1f1b", "zb-h1"):
        schedule = make_schedule(name, 4, 6)
        costs = {"forward": 1.0, "input_grad": 1.5, "weight_grad": 0.5, "comm": 0.25}
        implicit = simulate(schedule, **costs)
        explicit = simulate(lower(schedule), **costs)
        assert explicit.step_time == pytest.approx(implicit.step_time)
        assert explicit.step_time > simulate(schedule, **{**costs, "comm": 0.0}).step_time


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["gpipe", "1f1b", "zb-h1"]),
    st.integers(2, 5),
    st.integers(1, 6),
    st.data(),
)
def test_random_skip_graphs_lower_to_valid_schedules(
    name: str, p: int, m: int, data: st.DataObject
) -> None:
    pairs = [(a, b) for a in range(p) for b in range(a + 1, p)]
    chosen = data.draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)))
    boundaries: Edges = [(a, (b,)) for a, b in chosen]
    schedule = make_schedule(name, p, m)
    check_lowered(schedule, lower(schedule, boundaries), boundaries)


def test_tag_matched_lowering_keeps_receives_in_place() -> None:
    # Gloo matches messages by tag, so skips across chunks need no pair order
    schedule = make_schedule("interleaved-1f1b", 6, 1, 3)
    boundaries = skip_patterns(6)["from-first"]
    with pytest.raises(ScheduleError, match="cannot receive in send order"):
        lower(schedule, boundaries)
    lowered = lower(schedule, boundaries, match_pair_order=False)
    validate(lowered, boundaries, check_pair_order=False)
    with pytest.raises(ScheduleError, match="NCCL pairs sends and receives in order"):
        validate(lowered, boundaries)
    for row in lowered.actions:
        for a, nxt in zip(row, row[1:]):
            if a.kind.is_comm and a.kind.name.startswith("RECV"):
                assert (nxt.stage, nxt.microbatch) == (a.stage, a.microbatch)
