"""Simulator: timeline, memory, per-stage costs, argument checks, plans."""

from __future__ import annotations

import pytest

from pipec.errors import ConfigError, ScheduleError
from pipec.schedule.generators import make_schedule
from pipec.schedule.ir import ActionKind, Schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import simulate, simulate_plan


def test_timeline_of_a_tiny_1f1b() -> None:
    sim = simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=2.0, weight_grad=1.0)
    got = [(e.start, e.end, e.rank, str(e.action)) for e in sim.timeline]
    assert got == [
        (0.0, 1.0, 0, "0F0"),
        (1.0, 2.0, 0, "0F1"),
        (1.0, 2.0, 1, "1F0"),
        (2.0, 5.0, 1, "1B0"),
        (5.0, 6.0, 1, "1F1"),
        (5.0, 8.0, 0, "0B0"),
        (6.0, 9.0, 1, "1B1"),
        (9.0, 12.0, 0, "0B1"),
    ]
    assert sim.step_time == 12.0
    assert sim.busy_time == (8.0, 8.0)
    assert sim.bubble_fraction == pytest.approx(1 - 16 / 24)


def test_memory_over_time_and_peaks() -> None:
    held = [100.0, 10.0]
    sim = simulate(
        make_schedule("1f1b", 2, 2),
        forward=1.0,
        input_grad=2.0,
        weight_grad=1.0,
        activation_bytes=held,
    )
    assert sim.memory[0] == ((0.0, 100), (1.0, 200), (8.0, 100), (12.0, 0))
    assert sim.memory[1] == ((0.0, 0), (1.0, 10), (5.0, 10), (9.0, 0))  # free then alloc at 5.0
    assert sim.peak_memory == (200, 10)
    assert sim.peak_inflight == (2, 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_peak_memory_is_inflight_times_bytes(name: str) -> None:
    sim = simulate(
        make_schedule(name, 4, 8),
        forward=1.0,
        input_grad=1.0,
        weight_grad=0.5,
        activation_bytes=1000,
    )
    assert sim.peak_memory == tuple(1000 * n for n in sim.peak_inflight)
    assert all(points[-1][1] == 0 for points in sim.memory)
    times = [t for t, _ in sim.memory[0]]
    assert times == sorted(times)


def test_zb_h1_holds_activations_until_w() -> None:
    sim = simulate(
        make_schedule("zb-h1", 2, 2),
        forward=1.0,
        input_grad=1.0,
        weight_grad=1.0,
        activation_bytes=1,
    )
    w_ends = [e.end for e in sim.timeline if e.action.kind is ActionKind.W and e.rank == 1]
    frees = [t for t, b in sim.memory[1][1:] if b < 2]
    assert frees[-1] == w_ends[-1]


def test_per_stage_costs() -> None:
    schedule = make_schedule("gpipe", 3, 1)
    sim = simulate(
        schedule,
        forward=[1.0, 2.0, 3.0],
        input_grad=[1.0, 1.0, 1.0],
        weight_grad=0.0,
        comm=[0.5, 0.25, 0.0],
    )
    # one micro-batch: forward chain then backward chain, each hop paying its producer's latency
    assert sim.step_time == pytest.approx(1 + 0.5 + 2 + 0.25 + 3 + 1 + 0.25 + 1 + 0.5 + 1)
    assert sim.busy_time == pytest.approx((2.0, 3.0, 4.0))


def test_lowered_schedule_waits_in_receives() -> None:
    sim = simulate(
        lower(make_schedule("1f1b", 2, 1)), forward=1.0, input_grad=1.0, weight_grad=1.0, comm=0.5
    )
    recv = next(e for e in sim.timeline if e.action.kind is ActionKind.RECV_F)
    assert (recv.start, recv.end) == (0.0, 1.5)  # rank 1 waits from 0 until 0F0 + latency
    assert sim.busy_time == (3.0, 3.0)
    assert sim.step_time == pytest.approx(1 + 0.5 + 3 + 0.5 + 2)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"forward": [1.0, 2.0]}, "forward: expected one number or 3 (one per stage), found 2"),
        ({"input_grad": -1.0}, "input_grad: expected finite numbers >= 0"),
        ({"comm": float("nan")}, "comm: expected finite numbers"),
        ({"activation_bytes": [1, 2]}, "activation_bytes"),
    ],
)
def test_bad_costs_are_rejected(kwargs: dict[str, object], fragment: str) -> None:
    costs: dict[str, object] = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 1.0, **kwargs}
    with pytest.raises(ConfigError) as info:
        simulate(make_schedule("1f1b", 3, 2), **costs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_invalid_schedule_is_not_simulated() -> None:
    with pytest.raises(ScheduleError, match="deadlock"):
        crossed = Schedule.from_text("0: 0F0 0B0 0F1 0B1\n1: 1F1 1B1 1F0 1B0\n")
        simulate(crossed, forward=1, input_grad=1, weight_grad=1)
    with pytest.raises(ScheduleError, match="found none"):
        simulate(Schedule.from_text("0: 0F0\n"), forward=1, input_grad=1, weight_grad=1)


def _plan(schedule_name: str = "1f1b") -> object:
    from pipec.facade import Plan
    from pipec.plan import Boundary, PlanData, StageInfo
    from pipec.types import NodeCost

    node_costs = {
        "a": NodeCost(forward_time=1.0, input_grad_time=3.0, weight_grad_time=1.0, saved_bytes=100),
        "b": NodeCost(forward_time=1.0, input_grad_time=0.0, weight_grad_time=0.0, saved_bytes=50),
        "c": NodeCost(forward_time=2.0, input_grad_time=1.0, weight_grad_time=1.0, saved_bytes=10),
    }
    stages = (
        StageInfo(
            index=0,
            rank=0,
            nodes=("a", "b"),
            num_params=1,
            param_bytes=4,
            forward_time=2.0,
            backward_time=4.0,
            comm_time=0.5,
            memory_bytes=0,
        ),
        StageInfo(
            index=1,
            rank=1,
            nodes=("c",),
            num_params=1,
            param_bytes=4,
            forward_time=2.0,
            backward_time=2.0,
            comm_time=0.5,
            memory_bytes=0,
        ),
    )
    boundary = Boundary(
        name="b", producer_stage=0, consumer_stages=(1,), shape=(4,), dtype="float32", num_bytes=16
    )
    data = PlanData(
        model_name="toy",
        trace_method="fx",
        num_stages=2,
        num_ranks=2,
        stages_per_rank=1,
        num_microbatches=3,
        strategy="optimal",
        cost_model="test",
        schedule=make_schedule(schedule_name, 2, 3),
        stages=stages,
        boundaries=(boundary,),
        node_costs=node_costs,
        bottleneck=6.0,
        lower_bound=5.0,
    )
    return Plan(data)


def test_simulate_plan_uses_the_plans_costs() -> None:
    plan = _plan("zb-h1")
    sim = plan.simulate()  # type: ignore[attr-defined]
    assert sim == simulate_plan(plan.data)  # type: ignore[arg-type]
    assert sim.schedule.is_lowered
    durations = {str(e.action): e.end - e.start for e in sim.timeline}
    assert durations["0F0"] == pytest.approx(2.0)
    # stage 0 sends no gradient back (its input is the micro-batch): the runtime's I has
    # nothing to compute and W runs the whole backward (4.0), whatever the nodes' I:W (3:1)
    assert durations["0I0"] == pytest.approx(0.0)
    assert durations["0W0"] == pytest.approx(4.0)
    assert durations["1I0"] == pytest.approx(1.0)  # stage 1's 2.0 split by its nodes' I and W
    assert sim.peak_memory[0] == 150 * sim.peak_inflight[0]
    assert sim.peak_memory[1] == 10 * sim.peak_inflight[1]
    recv = [e for e in sim.timeline if str(e.action) == "1RECV_F0"][0]
    # a plan without boundary transfer times: comm_time 0.5 counts the message and its
    # gradient back on the one cross-rank edge, 0.25 each
    assert recv.end == pytest.approx(2.0 + 0.25)


def test_simulate_plan_charges_each_boundary_transfer_once() -> None:
    plan = _plan("zb-h1")
    data = plan.data  # type: ignore[attr-defined]
    timed = data.boundaries[0].model_copy(update={"transfer_times": (0.5,)})
    sim = simulate_plan(data.model_copy(update={"boundaries": (timed,)}))
    at = {str(e.action): e for e in sim.timeline}
    assert at["1RECV_F0"].end == pytest.approx(at["0F0"].end + 0.5)
    assert at["0RECV_B0"].end == pytest.approx(at["1I0"].end + 0.5)


def test_simulate_is_exported() -> None:
    import pipec

    assert pipec.simulate is simulate
    assert pipec.Simulation.__name__ == "Simulation"


# -- collectives after the schedule (the tied-gradient all-reduce) ----------------


def test_collectives_start_when_their_last_rank_is_free() -> None:
    from pipec.schedule.simulator import Collective, CollectiveSpan

    plain = simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=2.0, weight_grad=1.0)
    assert plain.collectives == () and plain.step_time == 12.0  # rank 1 ends at 9, rank 0 at 12
    sim = simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=2.0, weight_grad=1.0,
                   collectives=[Collective("embed", (1, 0), 2.5), ("rank 1 only", (1,), 1.0)])
    # the first waits for rank 0 (free at 12); the second runs on rank 1 after it
    assert sim.collectives == (CollectiveSpan(12.0, 14.5, (0, 1), "embed"),
                               CollectiveSpan(14.5, 15.5, (1,), "rank 1 only"))
    assert sim.step_time == 15.5
    assert sim.busy_time == plain.busy_time  # a collective is not compute
    assert sim.bubble_fraction == pytest.approx(1 - 16 / (2 * 15.5))
    assert sim.timeline == plain.timeline
    early = simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=2.0, weight_grad=1.0,
                     collectives=[Collective("rank 1", (1,), 2.0)])
    assert early.collectives[0].start == 9.0 and early.step_time == 12.0  # inside rank 0's tail


@pytest.mark.parametrize(
    "collective, fragment",
    [(("x", (0, 2), 1.0), "ranks in 0..1"), (("x", (), 1.0), "ranks in 0..1"),
     (("x", (0, 1), -1.0), "finite seconds"), (("x", (0, 1), float("nan")), "finite seconds")],
)
def test_bad_collectives_are_rejected(collective: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        simulate(make_schedule("1f1b", 2, 2), forward=1, input_grad=1, weight_grad=1,
                 collectives=[collective])  # type: ignore[list-item]


def test_simulate_plan_ends_with_the_tied_all_reduce() -> None:
    from pipec.facade import Plan
    from pipec.plan import TiedGroup
    from pipec.schedule.simulator import plan_collectives

    plan = _plan()
    plain = plan.simulate()  # type: ignore[attr-defined]
    tied = TiedGroup(fqn="w", aliases=("head.w",), stages=(0, 1), num_bytes=64, allreduce_time=1.25)
    with_tied = Plan(plan.data.model_copy(update={"tied_groups": (tied,)}))  # type: ignore[attr-defined]
    assert [tuple(c) for c in plan_collectives(with_tied.data)] == [("all-reduce w", (0, 1), 1.25)]
    sim = with_tied.simulate()
    last = max(e.end for e in sim.timeline)
    assert last == pytest.approx(plain.step_time)
    assert sim.collectives[0].start == pytest.approx(last)
    assert sim.step_time == pytest.approx(plain.step_time + 1.25)
    # stages sharing one rank exchange nothing
    one_rank = tied.model_copy(update={"stages": (0, 0)})
    assert plan_collectives(plan.data.model_copy(update={"tied_groups": (one_rank,)})) == ()  # type: ignore[attr-defined]


def test_malformed_collectives_are_config_errors() -> None:
    for bad in [("x", 3, 1.0), ("x", (0, 1)), ("x", (0, 1), "soon")]:
        with pytest.raises(ConfigError, match=r"expected \(name, ranks, seconds\)"):
            simulate(make_schedule("1f1b", 2, 2), forward=1, input_grad=1, weight_grad=1,
                     collectives=[bad])  # type: ignore[list-item]


def test_tied_shares_follow_the_runtimes_groups() -> None:
    from pipec.facade import Plan
    from pipec.partitioner.assemble import tied_shares
    from pipec.plan import TiedGroup
    from pipec.schedule.simulator import plan_collectives

    def group(stages: tuple[int, ...], seconds: float | None) -> TiedGroup:
        return TiedGroup(fqn="w", stages=stages, num_bytes=8, allreduce_time=seconds)

    def rank_of(k: int) -> int:
        return k % 2  # 4 stages interleaved on 2 ranks

    # stages 0 and 2 share rank 0: no all-reduce, nothing charged
    assert tied_shares([group((0, 2), 0.0)], 4, rank_of, 4) == [0.0] * 4
    # stages 0, 2, 3 on ranks 0 and 1: one all-reduce, each rank charged once (its first stage)
    assert tied_shares([group((0, 2, 3), 2.0)], 4, rank_of, 4) == [0.5, 0.0, 0.0, 0.5]
    # three ranks, one per stage (1f1b on 3 ranks): all three holders
    assert tied_shares([group((0, 1, 2), 3.0)], 3, lambda k: k, 2) == [1.5, 1.5, 1.5]
    # an older plan's group, not priced: no share, no collective
    assert tied_shares([group((0, 1), None)], 2, lambda k: k, 2) == [0.0, 0.0]
    plan = _plan()
    old = Plan(plan.data.model_copy(update={"tied_groups": (group((0, 1), None),)}))  # type: ignore[attr-defined]
    assert plan_collectives(old.data) == ()
    assert "not priced" in old.summary()
