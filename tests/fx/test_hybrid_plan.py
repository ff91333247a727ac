"""Planning D replicas of a pipeline: topology-aware mesh order, the data_parallel="auto"
search against brute force, what the plan and its summary say, and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import MLP, TiedLM

import pipec
from pipec.costs.analytic import AnalyticCostModel
from pipec.costs.hardware import spec_from_dict
from pipec.errors import ConfigError, PipecError
from pipec.partitioner.hybrid import plan_with_mesh, prepare_search
from pipec.partitioner.hybrid_search import search
from pipec.plan import PlanData
from pipec.schedule.mesh import DP_PP, PP_DP
from pipec.schedule.simulator import simulate_plan

pytestmark = pytest.mark.timeout(240)


def cluster(**changes: Any) -> AnalyticCostModel:
    """Two devices per node; the link between nodes 1,000x slower than inside one."""
    data = {
        "name": "two-per-node", "peak_flops": {"fp32": 1e13}, "memory_bandwidth": 1e12,
        "memory_capacity": 2**30, "gpus_per_node": 2, "intra_node_bandwidth": 1e11, "intra_node_latency": 1e-6,
        "inter_node_bandwidth": 1e8, "inter_node_latency": 1e-5, "kernel_launch_overhead": 1e-6,
        "source": {"peak_flops": "test", "memory_bandwidth": "test", "memory_capacity": "test"},
    }
    return AnalyticCostModel(spec_from_dict({**data, **changes}))


def step_with(data: PlanData, model: torch.nn.Module, x: torch.Tensor, order: tuple[str, str]) -> float:
    """The same configuration placed with ``order``: its simulated step."""
    from pipec.partitioner.inputs import first_microbatch
    from pipec.tracing import trace

    (mb,), _ = first_microbatch((x,), {}, data.data_parallel * data.num_microbatches)
    traced = trace(model, (mb,))
    cost = cluster()
    other = plan_with_mesh(
        traced, cost.node_costs(traced), cost, data_parallel=data.data_parallel, num_stages=data.num_stages,
        num_microbatches=data.num_microbatches, schedule=data.schedule.name, stages_per_rank=data.stages_per_rank,
        devices_per_node=2, memory_limit=None, strategy="optimal", optimizer_state_bytes_per_param=8,
        batch=x.shape[0], mesh_orders=(order,))
    return simulate_plan(other).step_time


def test_replicas_together_when_the_allreduce_dominates() -> None:
    # wide layers, a small batch: gradients are far larger than activations
    torch.manual_seed(0)
    model, x = MLP((256, 256, 256, 256, 256)), torch.randn(8, 256)
    plan = pipec.partition(model, x, num_stages=2, num_microbatches=2, data_parallel=2, cost_model=cluster())
    assert plan.data.mesh_order == PP_DP
    assert step_with(plan.data, model, x, DP_PP) > plan.simulate().step_time


def test_pipeline_together_when_transfers_dominate() -> None:
    # narrow layers over a long sequence: activations far larger than gradients
    torch.manual_seed(0)
    model, x = MLP((4, 4, 4, 4, 4)), torch.randn(8, 4096, 4)
    plan = pipec.partition(model, x, num_stages=2, num_microbatches=2, data_parallel=2, cost_model=cluster())
    assert plan.data.mesh_order == DP_PP
    assert step_with(plan.data, model, x, PP_DP) > plan.simulate().step_time


def test_plan_states_the_mesh_and_simulates_the_allreduce() -> None:
    torch.manual_seed(0)
    model, x = TiedLM(), torch.randint(0, 64, (8, 16))
    plan = pipec.partition(model, x, num_stages=2, num_microbatches=2, data_parallel=2, cost_model=cluster())
    d = plan.data
    assert (d.data_parallel, d.num_ranks, d.devices_per_node) == (2, 2, 2)
    assert all(st.dp_allreduce_time > 0 for st in d.stages)
    sim = plan.simulate()
    dp = [c for c in sim.collectives if c.name.startswith("dp all-reduce")]
    assert len(dp) == 2
    assert sim.step_time >= max(c.end for c in dp)
    text = plan.summary()
    assert "D=2 replicas x P=2 ranks" in text and f"mesh ({', '.join(d.mesh_order)})" in text
    assert "gradient all-reduce per stage" in text
    from pipec.viz.report import render_report

    html = render_report(d)
    assert 'id="devices"' in html and 'data-kind="dp-allreduce"' in html
    for g in range(4):  # every global rank in the layout, with its node
        assert f"<b>{g}</b> <small>node {g // 2}</small>" in html
    again = PlanData.model_validate_json(d.model_dump_json())
    assert (again.data_parallel, again.mesh_order, again.stages) == (d.data_parallel, d.mesh_order, d.stages)


def auto_inputs(num_devices: int, batch: int) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    torch.manual_seed(0)
    model, x = MLP((64, 128, 128, 128, 128, 64, 32)), torch.randn(batch, 64)
    prepared = prepare_search(
        model, x, num_devices=num_devices, devices_per_node=None, num_stages=None, num_microbatches=None,
        schedule="auto", stages_per_rank="auto", loss_fn=None, cost_model=cluster(), memory_limit=None,
        example_kwargs=None, method="auto", optimizer_state_bytes_per_param=8, leaf_modules=())
    return model, x, prepared


@pytest.mark.parametrize("num_devices,batch", [(4, 8), (8, 16)])
def test_pruning_loses_nothing(num_devices: int, batch: int) -> None:
    _, _, prepared = auto_inputs(num_devices, batch)
    pruned = search(prepared.inputs, prepared.configs, global_batch=batch)
    every = search(prepared.inputs, prepared.configs, global_batch=batch, prune=False)
    assert every.num_simulated == len({e.config for e in every.ranked})  # all of them, each once
    assert pruned.num_simulated < every.num_simulated
    assert pruned.best is not None and every.best is not None
    assert pruned.best.step_time == pytest.approx(every.best.step_time, rel=1e-9)
    assert pruned.best.step_time == min(e.step_time for e in every.ranked if e.simulated and e.fits)


@pytest.mark.parametrize("num_devices,batch", [(4, 8), (8, 16)])
def test_auto_matches_brute_force(num_devices: int, batch: int) -> None:
    """Every configuration planned on its own (traced at its micro-batch size, split,
    lowered, placed by both mesh orders, simulated): the auto plan is the best or
    within 2% of it."""
    from pipec.partitioner.inputs import first_microbatch
    from pipec.tracing import trace

    model, x, prepared = auto_inputs(num_devices, batch)
    plan = pipec.partition(model, x, data_parallel="auto", num_devices=num_devices, schedule="auto",
                           stages_per_rank="auto", cost_model=cluster())
    chosen = plan.simulate().step_time
    best = float("inf")
    cost = cluster()
    traced_at: dict[int, Any] = {}
    for c in {c._replace(mesh_order=DP_PP) for c in prepared.configs}:
        parts = c.data_parallel * c.num_microbatches
        if parts not in traced_at:
            (mb,), _ = first_microbatch((x,), {}, parts)
            traced = trace(model, (mb,))
            traced_at[parts] = (traced, cost.node_costs(traced))
        traced, costs = traced_at[parts]
        try:
            data = plan_with_mesh(
                traced, costs, cost, data_parallel=c.data_parallel, num_stages=c.num_stages,
                num_microbatches=c.num_microbatches, schedule=c.schedule, stages_per_rank=c.stages_per_rank,
                devices_per_node=2, memory_limit=None, strategy="optimal", optimizer_state_bytes_per_param=8,
                batch=batch)
        except PipecError:
            continue
        best = min(best, simulate_plan(data).step_time)
    assert chosen <= best * 1.02
    assert plan.data.data_parallel * plan.data.num_ranks == num_devices
    cand = plan.data.chosen_candidate
    assert cand is not None and cand.data_parallel == plan.data.data_parallel and cand.num_ranks == plan.data.num_ranks
    assert len(plan.data.candidates) > 1
    from pipec.viz.report import render_report

    assert f"D={plan.data.data_parallel} \u00d7 P={plan.data.num_ranks}" in render_report(plan.data)
    assert "D   P   mesh" in plan.summary()


def test_auto_respects_memory() -> None:
    torch.manual_seed(0)
    model, x = MLP((64, 512, 512, 512, 512, 64)), torch.randn(16, 64)
    one_device = sum(p.numel() for p in model.parameters()) * 16  # params, grads, optimizer state
    plan = pipec.partition(model, x, data_parallel="auto", num_devices=4, schedule="1f1b",
                           cost_model=cluster(memory_capacity=one_device // 2 + 2**20))
    assert plan.data.num_ranks >= 2  # D=4 x P=1 does not fit
    rows = [c for c in plan.data.candidates if c.num_ranks == 1]
    assert rows and not any(c.fits for c in rows)


def test_bad_input() -> None:
    model, x = MLP(), torch.randn(8, 16)
    cost = cluster()
    with pytest.raises(ConfigError, match="does not divide num_devices=8"):
        pipec.partition(model, x, data_parallel=3, num_devices=8, cost_model=cost)
    with pytest.raises(ConfigError, match="num_devices=8 without data_parallel"):
        pipec.partition(model, x, num_stages=2, num_devices=8, cost_model=cost)
    with pytest.raises(ConfigError, match="needs num_devices"):
        pipec.partition(model, x, data_parallel="auto", cost_model=cost)
    with pytest.raises(ConfigError, match="data_parallel x num_microbatches = 2 x 3 = 6"):
        pipec.partition(model, x, num_stages=2, data_parallel=2, num_microbatches=3, cost_model=cost)
    with pytest.raises(ConfigError, match="data_parallel"):
        pipec.partition(model, x, num_stages=2, data_parallel=0, cost_model=cost)
    with pytest.raises(ConfigError, match="devices_per_node"):
        pipec.partition(model, x, num_stages=2, data_parallel=2, devices_per_node=0, cost_model=cost)
    with pytest.raises(ConfigError, match="num_stages=3 with data_parallel=2 on num_devices=8"):
        pipec.partition(model, x, num_stages=3, data_parallel=2, num_devices=8, cost_model=cost)
    with pytest.raises(ConfigError, match="no configuration to try"):
        pipec.partition(model, torch.randn(3, 16), data_parallel="auto", num_devices=4, num_stages=4,
                        num_microbatches=2, cost_model=cost)
