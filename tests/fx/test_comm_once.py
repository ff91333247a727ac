"""The simulator charges each boundary transfer once (issue #14).

The partitioner's per-stage ``comm_time`` counts a stage's transfers in both
directions; the simulator used to spread it over the stage's edges and charge
it to every message in each direction, so on a two-stage chain a transfer cost
about ``2T`` instead of ``T``. The plan now stores each boundary's transfer time
and the simulator charges a message that, once: on a two-stage chain with one
micro-batch the step is ``F0 + T + F1 + B1 + T + B0``, by hand.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.types import NodeCost, TracedGraph

T = 0.25  # seconds per transfer, whatever its size


class ConstantLink:
    """A cost model whose every cross-rank transfer takes ``T`` seconds."""

    name = "constant-link"
    memory_capacity = None

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        raise NotImplementedError  # the test gives the node costs

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else T


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _plan(schedule: str) -> Plan:
    traced = pipec.trace(TwoLayers(), (torch.randn(2, 4),))
    costs = {n.name: NodeCost(forward_time=1.0 + i, input_grad_time=0.5 * (i + 1), weight_grad_time=0.25 * (i + 1))
             for i, n in enumerate(traced.nodes)}
    data = plan_from_split(traced, costs, ["b"], schedule=schedule, num_microbatches=1, cost_model=ConstantLink())
    return Plan(data, traced=traced)


def test_the_boundary_carries_its_transfer_time_once() -> None:
    plan = _plan("1f1b")
    (boundary,) = plan.boundaries
    assert boundary.producer_stage == 0 and boundary.consumer_stages == (1,)
    assert boundary.transfer_times == (T,)
    # the partitioner's stage time counts the activation out and its gradient back
    assert plan.stages[0].comm_time == pytest.approx(2 * T)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stage_chain_step_time_by_hand(schedule: str) -> None:
    plan = _plan(schedule)
    s0, s1 = plan.stages
    by_hand = s0.forward_time + T + s1.forward_time + s1.backward_time + T + s0.backward_time
    assert plan.simulate().step_time == pytest.approx(by_hand)


def test_two_stage_chain_step_time_by_hand_with_split_backward() -> None:
    plan = _plan("zb-h1")
    s0, s1 = plan.stages
    assert s0.input_grad_time is not None and s0.weight_grad_time is not None
    assert s1.input_grad_time is not None and s1.weight_grad_time is not None
    grad_sent = s0.forward_time + T + s1.forward_time + s1.input_grad_time
    rank1_done = grad_sent + s1.weight_grad_time
    rank0_done = grad_sent + T + s0.input_grad_time + s0.weight_grad_time
    assert plan.simulate().step_time == pytest.approx(max(rank0_done, rank1_done))
