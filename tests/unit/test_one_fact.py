"""One source for each fact (issue #14): tied-group ranks, link time, micro-batch splitting.

Each fact has one function; these tests check that the places that used to
re-derive it now agree with that function -- under a V-shaped placement too,
where the old ``stage % num_ranks`` and the plan's own ranks disagree.
"""

from __future__ import annotations

import torch

from pipec.costs.analytic import load_cost_model
from pipec.microbatch import chunk, split_inputs, split_target
from pipec.partitioner.assemble import tied_shares
from pipec.partitioner.inputs import first_microbatch, first_target
from pipec.partitioner.problem import ChainProblem
from pipec.plan import InputSpec, TiedGroup, holder_ranks
from pipec.schedule.ir import round_robin_placement, v_placement
from pipec.types import TensorMeta


def test_tied_group_ranks_follow_the_placement() -> None:
    group = TiedGroup(fqn="emb.weight", stages=(0, 3), num_bytes=64, allreduce_time=2.0)
    v = v_placement(4, 2)
    rr = round_robin_placement(4, 2)
    assert group.ranks(v.__getitem__) == holder_ranks((3, 0, 3), v.__getitem__) == (0,)
    assert group.ranks(rr.__getitem__) == (0, 1)
    # the partitioner's report: no all-reduce when the V puts both ends on rank 0 ...
    assert tied_shares([group], 4, v.__getitem__, 2) == [0.0] * 4
    # ... one per rank, on the rank's first holder, under round-robin
    assert tied_shares([group], 4, rr.__getitem__, 2) == [1.0, 0.0, 0.0, 1.0]


def test_the_chain_problem_places_stages_as_the_schedule_does() -> None:
    p = ChainProblem(compute_time=(1.0,) * 8, num_stages=4, num_ranks=2, placement=v_placement(4, 2))
    assert [p.rank_of(k) for k in range(4)] == [0, 1, 1, 0]
    assert [ChainProblem(compute_time=(1.0,) * 8, num_stages=4, num_ranks=2).rank_of(k) for k in range(4)] == [0, 1, 0, 1]


def test_every_transfer_is_the_one_link_time() -> None:
    model = load_cost_model("h100-sxm", gpus_per_node=2)
    spec = model.spec
    for src, dst in ((0, 1), (1, 2), (3, 0)):
        bandwidth, latency = spec.link(src, dst)
        assert spec.link_time(1 << 20, src, dst) == latency + (1 << 20) / bandwidth
        assert model.comm_time(1 << 20, src, dst) == spec.link_time(1 << 20, src, dst)
    assert model.comm_time(123, 2, 2) == 0.0
    # a two-rank ring all-reduce: 2 steps of half the bytes, each the link time at the bus efficiency
    eff = spec.allreduce_efficiency
    assert model.allreduce_time(1000, (0, 1)) == 2 * spec.link_time(500, 0, 1, efficiency=eff)
    # a profiled model's overrides go through the same formula
    assert spec.link_time(10, 0, 1, link_bandwidth=5.0, link_latency=1.0) == 1.0 + 10 / 5.0


def test_micro_batch_zero_is_the_same_rows_for_the_planner_and_the_runtime() -> None:
    x = torch.arange(24.0).reshape(6, 4)
    y = torch.arange(6)
    parts = chunk(x, 3)
    assert [p.shape[0] for p in parts] == [2, 2, 2] and torch.equal(torch.cat(parts), x)
    (planned,), _ = first_microbatch((x,), {}, 3)
    spec = InputSpec(name="x", meta=TensorMeta(shape=(2, 4), dtype="float32", num_bytes=32))
    run = split_inputs((x,), (spec,), 3, torch.device("cpu"))
    assert torch.equal(planned, run[0]["x"]) and torch.equal(planned, parts[0])
    assert torch.equal(first_target(y, 3), split_target(y, 3, torch.device("cpu"))[0])
    assert torch.equal(first_target(y, 3), chunk(y, 3)[0])
