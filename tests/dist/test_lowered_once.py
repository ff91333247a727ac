"""Lowered once per backend when the plan is made (issue #14).

The plan stores one lowered schedule per backend (``PlanData.lowered``:
``"gloo"``, and ``"nccl"`` when NCCL's per-pair message order can be met); the
runtime runs, ``plan.simulate()`` times, ``plan.save`` writes and the report
draws that stored schedule. Before, codegen and the simulator lowered with NCCL's
order while the Gloo runtime fell back on tag matching, so a plan that Gloo ran
could fail ``save()`` and ``simulate()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.errors import PlanError, ScheduleError
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.runtime.runtime import PipelineRuntime
from pipec.runtime.setup import lowered_schedule
from pipec.schedule.backends import lower_per_backend, plan_lowered
from pipec.schedule.ir import Schedule
from pipec.schedule.validator import validate
from pipec.types import NodeCost, TracedGraph


class FromFirst(nn.Module):
    """Six layers, each after the first also reading the first one's output: with six
    stages interleaved on two ranks, a skip from stage 0 to every later stage."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.tanh(self.layers[0](x))
        h = first
        for layer in self.layers[1:]:
            h = torch.tanh(layer(h)) * first
        return h


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _costs(traced: TracedGraph) -> dict[str, NodeCost]:
    return {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}


def _from_first_plan() -> Plan:
    torch.manual_seed(0)
    traced = pipec.trace(FromFirst(), (torch.randn(2, 4),))
    starts = [f"layers_{i}" for i in range(1, 6)]
    data = plan_from_split(traced, _costs(traced), starts, schedule="interleaved-1f1b", num_microbatches=1,
                           stages_per_rank=3)
    return Plan(data, traced=traced, loss_fn=F.mse_loss)


def _chain_plan(schedule: str = "1f1b") -> Plan:
    torch.manual_seed(0)
    traced = pipec.trace(Chain(), (torch.randn(2, 4),))
    data = plan_from_split(traced, _costs(traced), ["b"], schedule=schedule, num_microbatches=2)
    return Plan(data, traced=traced, loss_fn=F.mse_loss)


def test_a_plan_stores_its_lowering_per_backend_and_uses_it(tmp_path: Path) -> None:
    plan = _chain_plan()
    lowered = plan.data.lowered
    assert set(lowered) == {"gloo", "nccl"}
    for sched in lowered.values():
        assert sched.is_lowered and sched.compute_only() == plan.schedule
    assert plan.simulate().schedule == lowered["nccl"] == plan_lowered(plan.data)
    assert plan.simulate("gloo").schedule == lowered["gloo"]
    plan.save(tmp_path / "plan")
    text = (tmp_path / "plan" / "schedule.txt").read_text(encoding="utf-8")
    assert Schedule.from_text(text).actions == lowered["nccl"].actions
    assert pipec.load(tmp_path / "plan").data.lowered == lowered


def test_a_plan_whose_receives_cannot_follow_pair_order_saves_simulates_and_loads(tmp_path: Path) -> None:
    plan = _from_first_plan()
    assert plan.boundaries[0].producer_stage == 0 and len(plan.boundaries[0].consumer_stages) == 5
    # whole RECV actions cannot follow each pair's send order; the runtime keeps it per
    # message (Gloo by tag, NCCL in send order: tests/dist/test_interleaved_skips.py)
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    with pytest.raises(ScheduleError, match="NCCL pairs sends and receives in order"):
        validate(plan.data.lowered["nccl"], plan.boundaries, check_pair_order=True)
    sim = plan.simulate()
    assert sim.schedule == plan.data.lowered["nccl"]
    plan.save(tmp_path / "plan")  # used to fail: codegen lowered with NCCL's order
    loaded = pipec.load(tmp_path / "plan")
    assert loaded.simulate().step_time == pytest.approx(sim.step_time)
    assert lowered_schedule(loaded, "gloo") == plan.data.lowered["gloo"]
    # a plan saved when pipec stored only Gloo's lowering for it
    older = Plan(plan.data.model_copy(update={"lowered": {"gloo": plan.data.lowered["gloo"]}}), traced=plan.traced)
    with pytest.raises(PlanError, match="has no nccl lowering.*re-create the plan.*--backend gloo"):
        lowered_schedule(older, "nccl")


def test_a_stale_stored_lowering_is_refused() -> None:
    plan = _chain_plan()
    other = _chain_plan("gpipe").data.lowered
    stale = plan.data.model_copy(update={"lowered": other})
    with pytest.raises(PlanError, match="does not lower its schedule"):
        plan_lowered(stale, "gloo")
    # a plan saved before lowerings were stored is lowered on use, by the same policy
    old = plan.data.model_copy(update={"lowered": {}})
    assert plan_lowered(old, "gloo") == plan.data.lowered["gloo"]
    skips = _from_first_plan().data
    assert plan_lowered(skips.model_copy(update={"lowered": {}}), "nccl") == skips.lowered["nccl"]
    assert lower_per_backend(plan.schedule, plan.boundaries) == plan.data.lowered


def _executed(rank: int, world_size: int, plans: dict[str, Plan], x: Any, target: Any) -> dict[str, list[str]]:
    out = {}
    for key, plan in plans.items():
        pipe = PipelineRuntime(plan)
        pipe.step(x, target=target)
        out[key] = [text for *_, text in pipe.timeline()]
    return out


def test_the_runtime_runs_the_stored_lowering() -> None:
    plans = {"from-first": _from_first_plan(), "chain": _chain_plan("zb-h1")}
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    targets = {"from-first": target, "chain": target[:, :2]}
    per_rank = [
        run_ranks(_executed, 2, {key: plans[key]}, x, targets[key], timeout=180) for key in plans
    ]
    for key, ranks in zip(plans, per_rank):
        stored = plans[key].data.lowered["gloo"]
        for rank, got in enumerate(ranks):
            assert got[key] == [str(a) for a in stored.actions[rank]], f"{key} rank {rank}"
