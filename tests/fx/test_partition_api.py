"""pipec.partition: argument checks that say what to do, micro-batch splitting,
strategies, the default memory limit and the summary table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from models import MLP, TiedLM, TwoInput
from torch import nn

import pipec
from pipec.errors import ConfigError, CostModelError, PartitionError
from pipec.types import NodeCost, TracedGraph


class ByteCost:
    """Test cost model: time grows with the bytes a node writes and reads."""

    name = "bytes"

    def __init__(self, memory_capacity: int | None = None) -> None:
        self.memory_capacity = memory_capacity

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        out = {}
        for n in traced.nodes:
            busy = n.op not in ("placeholder", "get_attr", "output")
            work = (n.output_bytes + n.param_bytes) * 1e-9 + 1e-6 if busy else 0.0
            out[n.name] = NodeCost(forward_time=work, input_grad_time=work, weight_grad_time=0.0,
                                   saved_bytes=n.output_bytes if busy else 0)
        return out

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else 2e-6 + num_bytes * 1e-10


def mlp_partition(**kwargs: Any) -> pipec.Plan:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(num_stages=2, cost_model=ByteCost())
    args.update(kwargs)
    return pipec.partition(MLP(), (torch.randn(8, 16),), **args)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_stages=0), ConfigError, r"num_stages: expected >= 1"),
        (dict(num_stages=500), PartitionError, r"num_stages: expected 1\.\.\d+ .*fewer stages"),
        (dict(num_microbatches=0), ConfigError, r"num_microbatches: expected 1\.\.8"),
        (dict(num_microbatches=16), ConfigError, r"the batch has 8 samples"),
        (dict(num_microbatches=3), ConfigError, r"use one of \[1, 2, 4, 8\]"),
        (dict(schedule="2f2b"), ConfigError, r"schedule: expected one of .*1f1b"),
        (dict(cost_model="no-such-gpu"), CostModelError, r"no-such-gpu"),
        (dict(cost_model=42), ConfigError, r"cost_model: expected 'profile'"),
        (dict(memory_limit="lots"), ConfigError, r"memory_limit: cannot read 'lots'"),
        (dict(memory_limit=["1GiB"]), ConfigError, r"one per rank \(2\)"),
        (dict(memory_limit="1KiB"), PartitionError, r"smallest per-rank limit that fits is .*raise memory_limit"),
        (dict(device_speeds=[1.0]), ConfigError, r"device_speeds: expected 2 values"),
        (dict(device_speeds=[1.0, -1.0]), ConfigError, r"device_speeds\[1\]"),
        (dict(strategy="fastest"), PartitionError, r"strategy: expected one of optimal"),
        (dict(num_stages=3, stages_per_rank=2), ConfigError, r"divisor of num_stages=3"),
        (dict(num_microbatches="many"), ConfigError, r"num_microbatches: expected a whole number or 'auto'"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        mlp_partition(**kwargs)


def test_a_model_must_be_a_module() -> None:
    with pytest.raises(ConfigError, match="nn.Module"):
        pipec.partition(lambda x: x, (torch.randn(2, 2),), num_stages=1)  # type: ignore[arg-type]


def test_costs_are_per_micro_batch_and_the_batch_is_recorded() -> None:
    plan = mlp_partition()  # 2 ranks: default micro-batches = largest divisor of 8 that is <= 4
    assert plan.num_microbatches == 4 and plan.data.batch_size == 8
    (spec,) = plan.data.inputs
    assert spec.meta is not None and spec.meta.shape == (2, 16)
    assert all(b.shape[0] == 2 for b in plan.boundaries)
    assert plan.schedule.name == "1f1b" and plan.schedule.num_microbatches == 4


def test_keyword_inputs_are_split_too() -> None:
    torch.manual_seed(0)

    class Keyworded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TwoInput()

        def forward(self, a: torch.Tensor, *, b: torch.Tensor) -> torch.Tensor:
            return self.inner(a, b)

    plan = pipec.partition(Keyworded(), (torch.randn(6, 8),), example_kwargs={"b": torch.randn(6, 4)},
                           num_stages=2, num_microbatches=3, cost_model=ByteCost())
    shapes = {s.name: s.meta.shape for s in plan.data.inputs if s.meta is not None}
    assert sorted(shapes.values()) == [(2, 4), (2, 8)]


def test_default_memory_limit_is_the_cost_models_capacity() -> None:
    plan = mlp_partition(cost_model=ByteCost(memory_capacity=10**9))
    assert plan.data.memory_limit == (10**9, 10**9)
    with pytest.raises(PartitionError, match="fits the memory limit"):
        mlp_partition(cost_model=ByteCost(memory_capacity=2000))


def test_optimal_is_never_worse_than_a_baseline() -> None:
    torch.manual_seed(0)
    plans = {s: pipec.partition(TiedLM(), (torch.randint(0, 64, (4, 6)),), num_stages=3, num_microbatches=2,
                                cost_model=ByteCost(), strategy=s)
             for s in ("optimal", "equal-count", "by-params", "greedy")}
    for name, plan in plans.items():
        assert plan.data.strategy == name
        assert plans["optimal"].data.bottleneck <= plan.data.bottleneck


def test_interleaved_and_speeds_are_per_rank() -> None:
    plan = mlp_partition(num_stages=4, stages_per_rank=2, schedule="interleaved-1f1b",
                         device_speeds=[1.0, 2.0], memory_limit="1GiB")
    assert plan.num_ranks == 2 and [st.rank for st in plan.stages] == [0, 1, 0, 1]
    assert plan.data.device_speeds == (1.0, 2.0) and plan.data.memory_limit == (2**30, 2**30)


def test_default_cost_model_profiles_here() -> None:
    torch.manual_seed(0)
    plan = pipec.partition(MLP(), (torch.randn(4, 16),), num_stages=2, num_microbatches=2)
    assert plan.data.cost_model.startswith("profile") and plan.data.bottleneck > 0
    assert set(plan.node_costs) >= {n for st in plan.stages for n in st.nodes}


def test_analytic_cost_model_by_name() -> None:
    plan = mlp_partition(cost_model="h100-sxm", num_stages=3)
    assert plan.data.cost_model.endswith("h100-sxm") and plan.data.bottleneck > 0


def test_summary_lists_every_stage_and_the_bound() -> None:
    plan = mlp_partition(num_stages=3)
    text = plan.summary()
    lines = text.splitlines()
    for st in plan.stages:
        assert any(line.split()[:3] in ([str(st.index), str(st.rank), str(len(st.nodes))],
                                        [f"{st.index}", "*", str(st.rank)]) for line in lines)
    assert "lower bound" in text and "ratio" in text and "\x1b[" not in text
    ratio = plan.data.bottleneck / plan.data.lower_bound
    assert f"ratio {ratio:.3f}" in text


def test_a_plan_takes_stage_modules_built_elsewhere() -> None:
    plan = pipec.partition(MLP((8, 8, 8)), (torch.randn(4, 8),), num_stages=2, cost_model="h100-sxm")
    first = plan.stage_module(0)
    # kept from another plan object over the same data: used as given, nothing is split again
    again = pipec.Plan(plan.data, stage_modules={0: first})
    assert again.stage_module(0) is first
    with pytest.raises(pipec.PlanError, match="neither a traced graph nor a directory"):
        again.stage_module(1)
    with pytest.raises(ConfigError, match=r"stage index: expected an int in 0\.\.1, found 2"):
        pipec.Plan(plan.data, stage_modules={2: first})
