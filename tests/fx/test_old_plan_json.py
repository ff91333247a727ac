"""A plan.json written before issue #14's fields (schedule placement, stored lowerings,
boundary transfer times, per-stage I and W times) still loads, and simulates as the
new one does: placement round-robin, lowered on use by the same policy, each
transfer charged once (``comm_time / (2 x edges)`` per message on a chain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.types import NodeCost


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ConstantLink:
    name = "constant-link"
    memory_capacity = None

    def node_costs(self, traced: object) -> dict[str, NodeCost]:
        raise NotImplementedError

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else 0.125


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_plan_json_without_the_new_fields_loads_and_simulates_the_same(schedule: str, tmp_path: Path) -> None:
    traced = pipec.trace(Three(), (torch.randn(2, 4),))
    costs = {n.name: NodeCost(forward_time=1.0, input_grad_time=0.75, weight_grad_time=0.25) for n in traced.nodes}
    data = plan_from_split(traced, costs, ["b", "c"], schedule=schedule, num_microbatches=3, cost_model=ConstantLink())
    plan = Plan(data, traced=traced)
    plan.save(tmp_path / "plan")
    file = tmp_path / "plan" / "plan.json"
    raw = json.loads(file.read_text(encoding="utf-8"))
    del raw["schedule"]["placement"], raw["lowered"]
    for b in raw["boundaries"]:
        del b["transfer_times"]
    for st in raw["stages"]:
        del st["input_grad_time"], st["weight_grad_time"]
    file.write_text(json.dumps(raw), encoding="utf-8")
    old = pipec.load(tmp_path / "plan", verify=False)  # plan.json no longer matches the manifest
    assert old.schedule.placement == (0, 1, 2)
    assert old.data.lowered == {} and all(not b.transfer_times for b in old.boundaries)
    assert old.simulate().schedule == plan.simulate().schedule
    assert old.simulate().step_time == pytest.approx(plan.simulate().step_time)
