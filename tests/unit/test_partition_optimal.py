"""The optimal split against brute force over every split, on small random chains
with communication, skips, forbidden cuts, memory limits, device speeds and tied
parameters; the baselines never beat it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipec.errors import PartitionError
from pipec.partitioner.algorithm import STRATEGIES, exhaustive, optimal, solve
from pipec.partitioner.chain import evaluate, fits
from pipec.partitioner.problem import ChainProblem, ChainSolution, ChainTensor, ParamGroup
from pipec.partitioner.search import min_memory_limit


def link(num_bytes: int, src: int, dst: int) -> float:
    return 0.0 if src == dst else 0.25 + num_bytes / 64 + 0.125 * ((src + dst) % 3)


def all_splits(p: ChainProblem) -> list[ChainSolution]:
    return [evaluate(p, (0, *inner, p.num_nodes))
            for inner in itertools.combinations(p.cut_positions(), p.num_stages - 1)]


def brute_force(p: ChainProblem) -> float | None:
    feasible = [s.bottleneck for s in all_splits(p) if fits(p, s)]
    return min(feasible) if feasible else None


@st.composite
def problems(draw: st.DrawFn, *, limits: bool = True) -> ChainProblem:
    n = draw(st.integers(2, 10))
    s = draw(st.integers(1, min(n, 5)))
    r = draw(st.sampled_from([d for d in range(1, s + 1) if s % d == 0]))
    tensors = []
    for prod in range(n - 1):
        if draw(st.integers(0, 3)):
            # mostly the next node, sometimes a long skip (U-Net, attention mask)
            cons = {prod + 1} | set(draw(st.lists(st.integers(prod + 1, n - 1), max_size=2)))
            tensors.append(ChainTensor(prod, tuple(sorted(cons)), draw(st.integers(0, 64)),
                                       draw(st.booleans())))
    params = tuple(
        ParamGroup(draw(st.integers(1, 64)), draw(st.integers(1, 8)),
                   tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=2)))))
        for _ in range(draw(st.integers(0, 3)))
    )
    limit = st.one_of(st.none(), st.integers(100, 1200)) if limits else st.none()
    return ChainProblem(
        compute_time=tuple(draw(st.integers(0, 6)) / 2 for _ in range(n)),  # ties on purpose
        num_stages=s, tensors=tuple(tensors), params=params,
        cuttable=tuple(draw(st.integers(0, 5)) > 0 for _ in range(n + 1)),
        saved_bytes=tuple(draw(st.integers(0, 40)) for _ in range(n)),
        comm_time=draw(st.sampled_from([link, None])), num_ranks=r,
        device_speeds=tuple(draw(st.sampled_from([0.5, 1.0, 1.5])) for _ in range(r)),
        memory_limit=tuple(draw(limit) for _ in range(r)),
        schedule=draw(st.sampled_from(["gpipe", "1f1b", "zb-h1"])) if r == s else "interleaved-1f1b",
        num_microbatches=draw(st.integers(1, 6)),
    )


@settings(max_examples=250, deadline=None)
@given(problems())
def test_optimal_equals_brute_force(p: ChainProblem) -> None:
    if len(p.cut_positions()) < p.num_stages - 1:
        with pytest.raises(PartitionError, match="cut positions"):
            solve(p)
        return
    best = brute_force(p)
    if best is None:
        with pytest.raises(PartitionError, match="fits the memory"):
            solve(p)
        return
    got = solve(p)
    assert got.bottleneck == best  # the same stage_time on both sides: exact equality
    assert fits(p, got) and got.exact
    assert got == evaluate(p, got.cuts, "optimal")


@settings(max_examples=100, deadline=None)
@given(problems(limits=False))
def test_baselines_never_beat_optimal(p: ChainProblem) -> None:
    if len(p.cut_positions()) < p.num_stages - 1:
        return
    optimal = solve(p).bottleneck
    for strategy in STRATEGIES:
        got = solve(p, strategy)
        assert got.strategy == strategy and got.num_stages == p.num_stages
        assert got.bottleneck >= optimal


@settings(max_examples=80, deadline=None)
@given(problems())
def test_smallest_memory_limit_is_the_min_over_splits(p: ChainProblem) -> None:
    if len(p.cut_positions()) < p.num_stages - 1:
        return
    need, exact = min_memory_limit(p)
    per_stage = min(max(s.stage_memory) for s in all_splits(p))
    assert need == per_stage
    assert exact == (p.ranks == p.num_stages)
    if exact:
        assert need == min(max(s.rank_memory) for s in all_splits(p))


def test_infeasible_memory_names_the_limit_that_fits() -> None:
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=2, saved_bytes=(100, 100, 100, 100),
                     num_microbatches=1, memory_limit=(150, 150))
    with pytest.raises(PartitionError, match=r"smallest per-rank limit that fits is 200 B") as info:
        solve(p)
    assert "num_stages" in str(info.value) and "micro-batches" in str(info.value)


def test_too_few_cut_positions_says_how_many_stages_fit() -> None:
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=3, cuttable=(True, False, True, False, True))
    with pytest.raises(PartitionError, match="num_stages <= 2"):
        solve(p)


def test_unknown_strategy() -> None:
    with pytest.raises(PartitionError, match="equal-count"):
        solve(ChainProblem(compute_time=(1.0, 1.0), num_stages=2), "fastest")


def test_heavy_node_gets_a_stage_of_its_own() -> None:
    p = ChainProblem(compute_time=(1.0,) * 6 + (10.0,) + (1.0,) * 6, num_stages=3)
    sol = solve(p)
    assert sol.bottleneck == 10.0 and sol.cuts == (0, 6, 7, 13)


def test_memory_limit_moves_the_cut() -> None:
    # balanced by time would be (0, 2, 4); stage 0 holds two heavy activations under gpipe
    p = ChainProblem(compute_time=(1.0,) * 4, num_stages=2, saved_bytes=(50, 50, 1, 1),
                     schedule="gpipe", num_microbatches=2, memory_limit=(150, 150))
    assert solve(p).cuts == (0, 1, 4)
    assert solve(ChainProblem(compute_time=(1.0,) * 4, num_stages=2)).cuts == (0, 2, 4)


def test_faster_device_gets_more_work() -> None:
    p = ChainProblem(compute_time=(1.0,) * 9, num_stages=2, device_speeds=(2.0, 1.0))
    assert solve(p).cuts == (0, 6, 9)


def test_coupled_memory_on_shared_ranks_matches_exhaustive_search() -> None:
    # interleaved: stages 0 and 2 share rank 0, and the split that is optimal with each stage
    # checked alone puts 120 + 122 + ... over the rank's limit
    p = ChainProblem(compute_time=(2.0, 1.0, 3.0, 1.0, 4.0, 4.0), num_stages=4, num_ranks=2,
                     saved_bytes=(60, 60, 1, 1, 60, 1), schedule="interleaved-1f1b",
                     num_microbatches=2, memory_limit=(250, 250))
    # the per-stage split overflowed a rank: only the coupled search runs on then, and
    # without enumeration it is not exact
    assert not optimal(p, exhaustive_limit=0).exact
    got = solve(p)
    assert fits(p, got) and got.exact
    assert got.bottleneck == brute_force(p)
    found = exhaustive(p)
    assert found is not None and evaluate(p, found).bottleneck == got.bottleneck


def test_large_coupled_problems_fall_back_to_a_split_that_fits() -> None:
    p = ChainProblem(compute_time=(2.0, 1.0, 3.0, 1.0, 4.0, 4.0), num_stages=4, num_ranks=2,
                     saved_bytes=(60, 60, 1, 1, 60, 1), schedule="interleaved-1f1b",
                     num_microbatches=2, memory_limit=(250, 250))
    assert solve(p).exact  # small enough to enumerate
    got = optimal(p, exhaustive_limit=0)  # as if it were too large to enumerate
    assert fits(p, got) and not got.exact
    assert got.bottleneck >= brute_force(p)  # type: ignore[operator]
