"""The stage-cost definition: the vectorised stage_time/stage_memory against a
literal, loop-by-loop reading of the definition, and hand-computed cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipec.errors import PartitionError
from pipec.partitioner.chain import check_cuts, evaluate, stage_memory, stage_params, stage_time
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem, ChainTensor, ParamGroup


def link(num_bytes: int, src: int, dst: int) -> float:
    """A link whose cost depends on the rank pair, so wrong ranks show."""
    return 0.0 if src == dst else 0.5 + num_bytes / 100 + 0.25 * abs(src - dst)


def naive_time(p: ChainProblem, k: int, i: int, j: int) -> float:
    r = p.ranks
    speed = 1.0 if p.device_speeds is None else p.device_speeds[k % r]
    total = sum(p.compute_time[i:j]) / speed
    if p.comm_time is None:
        return total
    for t in p.tensors:
        mult = 2 if t.is_floating else 1
        if t.producer < i and any(i <= c < j for c in t.consumers):
            total += mult * p.comm_time(t.num_bytes, (k - 1) % r, k % r)
        if i <= t.producer < j and any(c >= j for c in t.consumers):
            total += mult * p.comm_time(t.num_bytes, k % r, (k + 1) % r)
    for g in p.params:
        inside = [i <= u < j for u in g.users]
        if any(inside) and not all(inside) and not g.is_buffer:
            src, dst = ((k, k + 1) if k < p.num_stages - 1 else (k - 1, k))
            if src % r != dst % r:  # a two-rank ring all-reduce: 2 steps of half the bytes
                half = -(-g.num_bytes // 2)
                total += 2 * p.comm_time(half, src % r, dst % r) / p.num_microbatches
    return total


def naive_memory(p: ChainProblem, k: int, i: int, j: int, in_flight: int) -> int:
    memory = 0
    for g in p.params:
        if any(i <= u < j for u in g.users):
            memory += g.num_bytes if g.is_buffer else 2 * g.num_bytes + g.numel * p.optimizer_state_bytes_per_param
    held = sum((p.saved_bytes or [0] * p.num_nodes)[i:j])
    m = p.num_microbatches
    # a receive buffer per micro-batch for inputs from another rank and for the gradients
    # of floating outputs sent to one (pipec.runtime.comm.P2P); on one rank, while in flight
    remote_in = k > 0 and p.rank_of(k - 1) != p.rank_of(k)
    remote_out = k < p.num_stages - 1 and p.rank_of(k + 1) != p.rank_of(k)
    buffers = 0
    for t in p.tensors:
        received = t.producer < i and any(i <= c < j for c in t.consumers)
        sent = i <= t.producer < j and any(c >= j for c in t.consumers)
        held += t.num_bytes * sent
        buffers += t.num_bytes * received * (m if remote_in else in_flight)
        buffers += t.num_bytes * (sent and t.is_floating and remote_out) * m
    return memory + held * in_flight + buffers


@st.composite
def problems(draw: st.DrawFn) -> ChainProblem:
    n = draw(st.integers(2, 9))
    s = draw(st.integers(1, min(n, 4)))
    r = draw(st.sampled_from([d for d in range(1, s + 1) if s % d == 0]))
    tensors = []
    for prod in range(n - 1):
        if draw(st.booleans()) or prod == 0:
            cons = draw(st.lists(st.integers(prod + 1, n - 1), min_size=1, max_size=3, unique=True))
            tensors.append(ChainTensor(prod, tuple(sorted(cons)), draw(st.integers(0, 64)), draw(st.booleans())))
    params = tuple(
        ParamGroup(draw(st.integers(1, 40)), draw(st.integers(1, 9)),
                   tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3)))),
                   draw(st.booleans()))
        for _ in range(draw(st.integers(0, 3)))
    )
    return ChainProblem(
        compute_time=tuple(draw(st.integers(0, 8)) / 4 for _ in range(n)),
        num_stages=s, tensors=tuple(tensors), params=params,
        saved_bytes=tuple(draw(st.integers(0, 20)) for _ in range(n)),
        comm_time=link, num_ranks=r,
        device_speeds=tuple(draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(r)),
        schedule=draw(st.sampled_from(["gpipe", "1f1b"])) if r == s else "interleaved-1f1b",
        num_microbatches=draw(st.integers(1, 6)),
    )


@settings(max_examples=120, deadline=None)
@given(problems(), st.data())
def test_stage_cost_matches_the_definition(p: ChainProblem, data: st.DataObject) -> None:
    # a segment stage k can hold in some split: stage 0 starts at 0, the last one ends at N
    n, s = p.num_nodes, p.num_stages
    k = data.draw(st.integers(0, s - 1))
    i = 0 if k == 0 else data.draw(st.integers(k, n - (s - k)))
    j = n if k == s - 1 else data.draw(st.integers(i + 1, n - (s - k - 1)))
    assert stage_time(p, k, i, j) == pytest.approx(naive_time(p, k, i, j), rel=1e-12, abs=1e-12)
    flight = tables_of(p).in_flight[k]
    assert stage_memory(p, k, i, j) == naive_memory(p, k, i, j, int(flight))


def test_a_skip_costs_only_its_producer_and_consumer_stages() -> None:
    # 0 -> 1 -> 2 -> 3 chain plus a skip 0 -> 3; stages [0,1) [1,2) [2,3) [3,4)
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=4,
                     tensors=(ChainTensor(0, (1, 3), 10), ChainTensor(1, (2,), 20), ChainTensor(2, (3,), 30)),
                     comm_time=lambda b, s, d: float(b))
    assert stage_time(p, 0, 0, 1) == 1 + 2 * 10  # sends the skip once although read on 1 and 3
    assert stage_time(p, 1, 1, 2) == 1 + 2 * 10 + 2 * 20
    assert stage_time(p, 2, 2, 3) == 1 + 2 * 20 + 2 * 30  # the skip passes by: nothing for it
    assert stage_time(p, 3, 3, 4) == 1 + 2 * 10 + 2 * 30


def test_integer_tensors_carry_no_gradient_and_speed_divides_compute() -> None:
    p = ChainProblem(compute_time=(2.0, 2.0), num_stages=2, num_ranks=2, device_speeds=(1.0, 4.0),
                     tensors=(ChainTensor(0, (1,), 5, is_floating=False),), comm_time=lambda b, s, d: float(b))
    assert stage_time(p, 0, 0, 1) == 2.0 + 5
    assert stage_time(p, 1, 1, 2) == 0.5 + 5


def test_tied_parameter_counts_on_each_holder_and_exchanges_its_gradient() -> None:
    p = ChainProblem(compute_time=(1.0, 1.0, 1.0), num_stages=2, num_microbatches=4,
                     params=(ParamGroup(100, 25, (0, 2)), ParamGroup(10, 2, (1,))),
                     optimizer_state_bytes_per_param=8, comm_time=lambda b, s, d: b / 100)
    both = 2 * 100 + 25 * 8
    assert stage_memory(p, 0, 0, 2) == both + 2 * 10 + 2 * 8
    assert stage_memory(p, 1, 2, 3) == both
    assert stage_time(p, 0, 0, 2) == 2.0 + 1.0 / 4  # one exchange per step, over 4 micro-batches
    assert stage_params(p, 0, 2) == (27, 110)
    whole = ChainProblem(compute_time=(1.0, 1.0, 1.0), num_stages=1, params=p.params,
                         comm_time=lambda b, s, d: b / 100)
    assert stage_time(whole, 0, 0, 3) == 3.0  # not split: nothing to exchange


def test_activations_scale_with_micro_batches_in_flight() -> None:
    base = dict(compute_time=(1.0,) * 4, num_stages=4, saved_bytes=(10, 20, 30, 40), num_microbatches=8)
    gpipe = ChainProblem(**base, schedule="gpipe")  # type: ignore[arg-type]
    one_f = ChainProblem(**base, schedule="1f1b")  # type: ignore[arg-type]
    assert [stage_memory(gpipe, k, k, k + 1) for k in range(4)] == [80, 160, 240, 320]
    assert [stage_memory(one_f, k, k, k + 1) for k in range(4)] == [40, 60, 60, 40]  # min(S - k, m)


def test_evaluate_sums_memory_per_rank() -> None:
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=4, num_ranks=2, saved_bytes=(1, 2, 3, 4),
                     schedule="interleaved-1f1b", num_microbatches=4)
    sol = evaluate(p, (0, 1, 2, 3, 4))
    assert sol.rank_memory == (sol.stage_memory[0] + sol.stage_memory[2], sol.stage_memory[1] + sol.stage_memory[3])
    assert sol.bottleneck == max(sol.stage_times) == 1.0


@pytest.mark.parametrize("cuts", [(0, 2), (0, 2, 2, 4), (1, 2, 4), (0, 3, 2, 4)])
def test_bad_cuts_are_rejected(cuts: tuple[int, ...]) -> None:
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=3)
    with pytest.raises(PartitionError, match="strictly increasing"):
        check_cuts(p, cuts)


def test_a_cut_where_a_non_tensor_is_live_is_rejected() -> None:
    p = ChainProblem(compute_time=(1.0,) * 3, num_stages=2, cuttable=(True, False, True, True))
    with pytest.raises(PartitionError, match="not a plain tensor"):
        check_cuts(p, (0, 1, 3))
    assert check_cuts(p, (0, 2, 3)) == (0, 2, 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_stages", 5), ("num_stages", 0), ("device_speeds", (1.0, 0.0)), ("memory_limit", (1,)),
     ("cuttable", (True,)), ("tensors", (ChainTensor(2, (1,), 4),))],
)
def test_invalid_problem_fields_are_partition_errors(field: str, value: object) -> None:
    kwargs: dict[str, object] = dict(compute_time=(1.0,) * 4, num_stages=2, num_ranks=2)
    kwargs[field] = value
    with pytest.raises(PartitionError, match=field):
        ChainProblem(**kwargs)  # type: ignore[arg-type]
