"""``pipec.partition(..., recompute=...)`` end to end on a traced model (analytic costs):
auto adds no recompute when memory is ample and recomputes when it must; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pipec
from pipec.errors import ConfigError, PartitionError
from pipec.facade import Plan
from pipec.partitioner.search import min_memory_limit
from pipec.partitioner.single import chain_for
from pipec.plan import PlanData


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) * torch.sigmoid(x)
        return x


def _plan(**kw: object) -> pipec.Plan:
    torch.manual_seed(0)
    return pipec.partition(Stack(), (torch.randn(64, 64),), num_stages=2, num_microbatches=4,
                           cost_model="h100-sxm", **kw)  # type: ignore[arg-type]


def test_auto_is_none_when_memory_is_ample_and_recomputes_when_not() -> None:
    plain = _plan()
    auto = _plan(recompute="auto")
    assert [st.recompute for st in auto.stages] == ["none", "none"]
    assert auto.data.bottleneck == plain.data.bottleneck and auto.data.recompute == "auto"
    assert plain.traced is not None
    chain = chain_for(plain.traced, plain.data.node_costs, plain.data.schedule, cost_model=None,
                      memory_limit=None, device_speeds=None, optimizer_state_bytes_per_param=8)
    limit = min_memory_limit(chain.problem)[0] - 1  # no split fits without recompute
    with pytest.raises(PartitionError, match="smallest per-rank limit that fits is") as info:
        _plan(memory_limit=limit)
    assert "recompute='auto'" in str(info.value)
    tight = _plan(recompute="auto", memory_limit=limit)
    assert any(st.recompute != "none" for st in tight.stages)
    assert all(st.memory_bytes <= limit for st in tight.stages)
    assert tight.data.bottleneck > plain.data.bottleneck
    assert "recompute" in tight.summary() and any(st.recompute in tight.summary() for st in tight.stages)


def test_full_adds_its_forward_to_the_backward() -> None:
    plain, full = _plan(), _plan(recompute="full")
    for a, b in zip(plain.stages, full.stages):
        assert b.recompute == "full" and b.recompute_time == pytest.approx(a.forward_time, rel=1e-6)
        assert b.backward_time == pytest.approx(a.backward_time + b.recompute_time)


def test_unknown_recompute_mode() -> None:
    with pytest.raises(ConfigError, match="recompute: expected one of"):
        _plan(recompute="some")


class OnlyLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_selective_on_a_stage_with_nothing_to_recompute() -> None:
    """Each stage is one Linear: selective keeps its output, so it recomputes nothing."""
    with pytest.raises(PartitionError, match="stage 0 .* has no nodes to recompute"):
        pipec.partition(OnlyLinear(), (torch.randn(8, 8),), num_stages=2, num_microbatches=2,
                        cost_model="h100-sxm", recompute="selective")


def test_old_plan_json_loads_without_recompute_and_simulation_counts_kept_bytes() -> None:
    """plan.json from before the recompute fields loads as "none"; a full-recompute plan
    holds fewer activation bytes in the simulation than the same split without."""
    plain, full = _plan(), _plan(recompute="full")
    raw = plain.data.model_dump(mode="json")
    raw.pop("recompute")
    for st in raw["stages"]:
        for key in ("recompute", "recompute_time", "kept_bytes"):
            st.pop(key)
    old = PlanData.model_validate(raw)
    assert old.recompute == "none" and {st.recompute for st in old.stages} == {"none"}
    assert all(st.kept_bytes is None for st in old.stages)
    assert Plan(old).simulate().peak_memory == plain.simulate().peak_memory
    assert [st.kept_bytes for st in full.stages] == [0, 0]
    assert max(full.simulate().peak_memory) < max(plain.simulate().peak_memory)
