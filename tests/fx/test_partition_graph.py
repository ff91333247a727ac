"""From traced graphs to plans: boundaries (skips go straight to their reader),
tied groups, the memory model, forbidden cuts, manual splits, and stage modules
that chained by the plan's boundaries reproduce the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from models import MLP, ResNet, TiedLM, TwoInput, UNet
from torch import nn

import pipec
from pipec.errors import PartitionError
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.partitioner.graph import build_chain, compute_names
from pipec.partitioner.single import partition_traced
from pipec.types import NodeCost, TracedGraph


class ByteCost:
    """Test cost model: time grows with the bytes a node writes and reads."""

    name = "bytes"
    memory_capacity = None

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        costs = {}
        for n in traced.nodes:
            busy = n.op not in ("placeholder", "get_attr", "output")
            work = (n.output_bytes + n.param_bytes) * 1e-9 + 1e-6 if busy else 0.0
            costs[n.name] = NodeCost(forward_time=work, input_grad_time=work, weight_grad_time=work if n.params else 0.0,
                                     saved_bytes=n.output_bytes if busy else 0, output_bytes=n.output_bytes,
                                     param_bytes=n.param_bytes)
        return costs

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else 2e-6 + num_bytes * 1e-10



def traced_plan(traced: TracedGraph, costs: Mapping[str, NodeCost], **kwargs: Any) -> Plan:
    """partition_traced's plan data as a Plan that can build its stages."""
    return Plan(partition_traced(traced, costs, **kwargs), traced=traced)


def manual_plan(traced: TracedGraph, costs: Mapping[str, NodeCost], split: Any, **kwargs: Any) -> Plan:
    """plan_from_split's plan data as a Plan that can build its stages."""
    return Plan(plan_from_split(traced, costs, split, **kwargs), traced=traced)

def traced_of(model: nn.Module, *inputs: torch.Tensor) -> tuple[TracedGraph, Mapping[str, NodeCost]]:
    traced = pipec.trace(model, inputs)
    return traced, ByteCost().node_costs(traced)


def run_stages(plan: Plan, *inputs: torch.Tensor) -> Any:
    """Run the stage modules one after another, passing values by boundary name."""
    assert plan.traced is not None
    env: dict[str, Any] = dict(zip(plan.traced.input_names, inputs))
    out = None
    for k in range(plan.num_stages):
        module = plan.stage_module(k)
        result = module(*[env[n] for n in module.input_names])
        env.update(zip(module.output_names, result))
        out = result[-1] if k == plan.num_stages - 1 else None
    return out


def test_unet_skip_goes_from_its_producer_straight_to_its_reader() -> None:
    torch.manual_seed(0)
    model, x = UNet(), torch.randn(2, 1, 16, 16)
    traced, costs = traced_of(model, x)
    names = compute_names(traced)
    # four equal-count stages: the first encoder output (inc) is read only by the last decoder block
    quarter = len(names) // 4
    plan = manual_plan(traced, costs, [quarter, 2 * quarter, 3 * quarter], cost_model=ByteCost(),
                           num_microbatches=4)
    producer = {n: k for k, st in enumerate(plan.stages) for n in st.nodes}
    readers: dict[str, set[int]] = {}
    for info in traced.nodes:
        stage = plan.num_stages - 1 if info.op == "output" else producer.get(info.name)
        for src in info.inputs:
            if stage is not None and src in producer and producer[src] != stage:
                readers.setdefault(src, set()).add(stage)
    assert {b.name: set(b.consumer_stages) for b in plan.boundaries} == readers
    skip = next(b for b in plan.boundaries if b.name == "inc_2")
    assert (skip.producer_stage, skip.consumer_stages) == (0, (3,))
    torch.testing.assert_close(run_stages(plan, x), model(x))


def test_stage_memory_is_params_optimizer_and_activations_in_flight() -> None:
    torch.manual_seed(0)
    model, x = UNet(), torch.randn(2, 1, 16, 16)
    traced, costs = traced_of(model, x)
    plan = traced_plan(traced, costs, num_stages=4, num_microbatches=8, cost_model=ByteCost())
    for st in plan.stages:
        held = sum(costs[n].saved_bytes for n in st.nodes)
        sent = [b for b in plan.boundaries if b.producer_stage == st.index]
        held += sum(b.num_bytes for b in sent)
        # one receive buffer per micro-batch: inputs, and gradients of floating outputs
        buffers = sum(b.num_bytes for b in plan.boundaries if st.index in b.consumer_stages)
        buffers += sum(b.num_bytes for b in sent if b.is_floating)
        in_flight = min(plan.num_stages - st.index, 8)  # 1f1b
        # the last stage's loss backward: the model output's gradient and one temporary of its size
        loss = 2 * costs[st.nodes[-1]].output_bytes if st.index == plan.num_stages - 1 else 0
        assert st.memory_bytes == 2 * st.param_bytes + 8 * st.num_params + held * in_flight + buffers * 8 + loss


def test_tied_embedding_is_a_tied_group_on_both_holders() -> None:
    torch.manual_seed(0)
    model, tokens = TiedLM(), torch.randint(0, 64, (2, 6))
    traced, costs = traced_of(model, tokens)
    plan = traced_plan(traced, costs, num_stages=3, num_microbatches=2, cost_model=ByteCost())
    (group,) = plan.data.tied_groups
    assert group.fqn == "embed.weight" and group.aliases == ("head.weight",)
    assert group.stages == (0, 2) and group.num_bytes == 64 * 16 * 4
    assert plan.stages[0].param_bytes >= group.num_bytes and plan.stages[2].param_bytes >= group.num_bytes
    torch.testing.assert_close(run_stages(plan, tokens), model(tokens))
    # ByteCost has no allreduce_time: a two-rank ring of its transfers, once per step
    half = group.num_bytes // 2
    assert group.allreduce_time == pytest.approx(2 * ByteCost().comm_time(half, 0, 2))
    # the holders' stage time carries its share per micro-batch, apart from the boundary comm
    for st in plan.stages:
        assert st.tied_time == (pytest.approx(group.allreduce_time / 2) if st.index in (0, 2) else 0.0)
    assert max(st.time for st in plan.stages) == pytest.approx(plan.data.bottleneck)
    # the simulated step ends with the all-reduce between ranks 0 and 2
    sim = plan.simulate()
    (span,) = sim.collectives
    assert span.ranks == (0, 2) and span.end - span.start == pytest.approx(group.allreduce_time)
    assert sim.step_time == pytest.approx(span.end)


def test_the_cost_models_allreduce_prices_the_tied_gradient() -> None:
    class WithAllReduce(ByteCost):
        def allreduce_time(self, num_bytes: int, ranks: Any) -> float:
            return 1e-3 * len(tuple(ranks)) + num_bytes * 1e-9

    torch.manual_seed(0)
    model, tokens = TiedLM(), torch.randint(0, 64, (2, 6))
    traced, costs = traced_of(model, tokens)
    plan = traced_plan(traced, costs, num_stages=2, num_microbatches=4, cost_model=WithAllReduce())
    (group,) = plan.data.tied_groups
    assert group.allreduce_time == pytest.approx(2e-3 + group.num_bytes * 1e-9)
    assert [st.tied_time for st in plan.stages] == pytest.approx([group.allreduce_time / 4] * 2)


@pytest.mark.parametrize("make", [MLP, ResNet, TwoInput])
def test_optimal_stages_reproduce_the_model(make: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = make()
    inputs = {MLP: (torch.randn(2, 16),), ResNet: (torch.randn(2, 3, 8, 8),),
              TwoInput: (torch.randn(2, 8), torch.randn(2, 4))}[make]
    traced, costs = traced_of(model, *inputs)
    plan = traced_plan(traced, costs, num_stages=3, num_microbatches=1, cost_model=ByteCost())
    assert [len(st.nodes) > 0 for st in plan.stages] == [True] * 3
    assert max(st.time for st in plan.stages) == pytest.approx(plan.data.bottleneck, rel=1e-9)
    assert plan.data.bottleneck >= plan.data.lower_bound
    torch.testing.assert_close(run_stages(plan, *inputs), model(*inputs))


class SizeUser(nn.Module):
    """Reads ``x.size(0)`` (an int) early and uses it late: no cut may separate the two."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = self.b(torch.relu(self.a(x)))
        return self.c(h.view(n, -1))


def test_a_live_int_forbids_cuts() -> None:
    traced, costs = traced_of(SizeUser(), torch.randn(2, 8))
    chain = build_chain(traced, costs, num_stages=1)
    names = chain.names
    size_at, view_at = names.index("size"), names.index("view")
    allowed = chain.problem.cut_positions()
    assert not any(size_at < c <= view_at for c in allowed)
    with pytest.raises(PartitionError, match=r"num_stages <= \d"):
        traced_plan(traced, costs, num_stages=len(allowed) + 2, num_microbatches=1)


def test_manual_split_forms_agree() -> None:
    torch.manual_seed(0)
    traced, costs = traced_of(MLP(), torch.randn(2, 16))
    names = compute_names(traced)
    by_lists = manual_plan(traced, costs, [list(names[:3]), list(names[3:7]), list(names[7:])])
    by_cuts = manual_plan(traced, costs, [3, 7])
    by_starts = manual_plan(traced, costs, [names[3], names[7]])
    assert by_lists.data == by_cuts.data == by_starts.data
    assert [st.nodes for st in by_cuts.stages] == [names[:3], names[3:7], names[7:]]
    assert by_cuts.data.strategy == "manual"


@pytest.mark.parametrize(
    ("split", "message"),
    [([[]], "every compute node"), ([0, 2], "strictly increasing"), (["nope"], "not compute nodes"),
     ([3.5], "expected a list")],
)
def test_bad_manual_split(split: Any, message: str) -> None:
    traced, costs = traced_of(MLP(), torch.randn(2, 16))
    with pytest.raises(PartitionError, match=message):
        manual_plan(traced, costs, split)


def test_interleaved_tied_plan_reports_the_runtimes_all_reduce() -> None:
    torch.manual_seed(0)
    model, tokens = TiedLM(), torch.randint(0, 64, (4, 6))
    traced, costs = traced_of(model, tokens)
    plan = traced_plan(traced, costs, num_stages=4, num_microbatches=4, cost_model=ByteCost(),
                            schedule="interleaved-1f1b", stages_per_rank=2)
    (group,) = plan.data.tied_groups
    assert group.stages == (0, 3) and [plan.stages[k].rank for k in group.stages] == [0, 1]
    assert group.allreduce_time == pytest.approx(2 * ByteCost().comm_time(group.num_bytes // 2, 0, 1))
    assert [st.tied_time for st in plan.stages] == pytest.approx([group.allreduce_time / 4, 0, 0, group.allreduce_time / 4])
    (span,) = plan.simulate().collectives
    assert span.ranks == (0, 1)
