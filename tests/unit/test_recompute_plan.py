"""Activation recompute in the partitioner: the per-stage choice under the memory limit,
the memory prediction per policy, and bad input (synthetic chain problems, no timing)."""

from __future__ import annotations

import dataclasses

import pytest

from pipec.costs.recompute import check_request, options_of
from pipec.errors import ConfigError, PartitionError
from pipec.partitioner.algorithm import optimal
from pipec.partitioner.chain import evaluate, stage_memory, stage_policy, stage_time
from pipec.partitioner.problem import ChainProblem, ChainTensor
from pipec.partitioner.search import min_memory_limit
from pipec.schedule.generators import make_schedule
from pipec.schedule.in_flight import in_backward_from_schedule

N = 8
SAVED = 100  # bytes each node keeps for backward
OUT = 40  # bytes of each node's output (kept by selective on matmul-like nodes)


def _problem(limit: int | None, recompute: tuple[str, ...] = ("none", "selective", "full"),
             in_backward: tuple[int, ...] | None = None) -> ChainProblem:
    return ChainProblem(
        compute_time=(3.0,) * N, num_stages=2, saved_bytes=(SAVED,) * N,
        tensors=tuple(ChainTensor(i, (i + 1,), 10) for i in range(N - 1)),
        memory_limit=None if limit is None else (limit, limit), schedule="1f1b", num_microbatches=4,
        in_flight=(2, 1), recompute=recompute, forward_time=(1.0,) * N,
        matmul=tuple(i % 2 == 0 for i in range(N)), output_bytes=(OUT,) * N, in_backward=in_backward,
    )


def test_memory_per_policy_counts_kept_bytes_in_flight_and_one_microbatch_in_full() -> None:
    """Stage 0 of [0, 4) holds 2 micro-batches; it sends one 10-byte tensor, held while its
    micro-batch is in flight (2), and receives its gradient into one buffer per micro-batch (4)."""
    boundary = 10 * 2 + 10 * 4
    for policy, kept in (("none", 4 * SAVED), ("selective", 2 * OUT), ("full", 0)):
        p = _problem(None, recompute=(policy,))
        want = boundary + kept * (2 - 1) + 4 * SAVED * 1
        assert stage_memory(p, 0, 0, 4) == want, policy
        assert stage_policy(p, 0, 0, 4) == policy
    # time: selective recomputes the 2 non-matmul nodes, full all 4 (forward 1.0 s each)
    assert stage_time(_problem(None, ("selective",)), 0, 0, 4) == pytest.approx(12.0 + 2.0)
    assert stage_time(_problem(None, ("full",)), 0, 0, 4) == pytest.approx(12.0 + 4.0)


def test_in_backward_counts_microbatches_between_i_and_w() -> None:
    assert in_backward_from_schedule(make_schedule("1f1b", 4, 8)) == (1, 1, 1, 1)
    zb = in_backward_from_schedule(make_schedule("zb-h1", 4, 8))
    assert max(zb) > 1 and min(zb) >= 1
    p = _problem(None, ("full",), in_backward=(2, 1))
    assert stage_memory(p, 0, 0, 4) == 60 + 4 * SAVED * 2  # two micro-batches' activations in full


def test_auto_keeps_everything_when_memory_is_ample() -> None:
    sol = optimal(_problem(10**9))
    plain = optimal(_problem(10**9, recompute=("none",)))
    assert sol.cuts == plain.cuts and sol.bottleneck == plain.bottleneck
    assert [stage_policy(_problem(10**9), k, sol.cuts[k], sol.cuts[k + 1]) for k in range(2)] == ["none", "none"]


def test_auto_recomputes_when_no_split_fits_without() -> None:
    limit = min_memory_limit(_problem(None, ("none",)))[0] - 1
    with pytest.raises(PartitionError, match=r"smallest per-rank limit that fits is .*recompute='auto'; with it"):
        optimal(_problem(limit, ("none",)))
    assert min_memory_limit(_problem(limit))[0] < limit  # the limit named with recompute is smaller
    p = _problem(limit)
    sol = optimal(p)
    policies = [stage_policy(p, k, sol.cuts[k], sol.cuts[k + 1]) for k in range(2)]
    assert all(m <= limit for m in sol.rank_memory)
    assert any(policy != "none" for policy in policies)
    # it is the fastest: no split and per-stage choice among all fits and is faster
    best = min(
        max(stage_time(p, 0, 0, c), stage_time(p, 1, c, N))
        for c in range(1, N)
        if max(stage_memory(p, 0, 0, c), stage_memory(p, 1, c, N)) <= limit
    )
    assert sol.bottleneck == pytest.approx(best)


def test_auto_picks_full_only_where_selective_does_not_fit() -> None:
    p = _problem(None, ("selective",))
    sel = evaluate(p, (0, 4, 8))
    full = evaluate(_problem(None, ("full",)), (0, 4, 8))
    limit = (sel.rank_memory[0] + full.rank_memory[0]) // 2  # stage 0 fits only with full
    q = _problem(max(limit, sel.rank_memory[1]))
    assert stage_policy(q, 0, 0, 4) == "full"
    assert stage_policy(q, 1, 4, 8) == "none"


def test_unknown_recompute_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="recompute: expected one of 'auto', 'none', 'selective', 'full'"):
        check_request("sometimes")
    assert options_of("auto") == ("none", "selective", "full")
    with pytest.raises(PartitionError, match="recompute"):
        _problem(None, recompute=("partial",))


def test_zero_bubble_split_counts_the_gradients_kept_for_w() -> None:
    """Between I and W each micro-batch keeps, per matmul-like node, the gradient I captured."""
    base = _problem(None, ("none",))
    held = dataclasses.replace(base, held_grads=(2, 2))
    matmul_out = 2 * OUT  # nodes 4 and 6 of [4, 8) are matmul-like
    assert stage_memory(held, 1, 4, 8) == stage_memory(base, 1, 4, 8) + 2 * matmul_out
    # the first stage has no boundary input: its I captures nothing, W runs its whole backward
    assert stage_memory(held, 0, 0, 4) == stage_memory(base, 0, 0, 4)
