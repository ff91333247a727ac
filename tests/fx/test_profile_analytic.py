"""The analytic (roofline) cost model on traced graphs: counted FLOPs, plausible ratios."""

from __future__ import annotations

import models
import pytest
import torch

import pipec
from pipec.costs.analytic import AnalyticCostModel

FREE = ("placeholder", "get_attr", "output")


@pytest.fixture(scope="module")
def gpt2() -> pipec.TracedGraph:
    model, inputs = models.example("gpt2", batch=2)
    return pipec.trace(model, inputs, method="export")


def test_linear_flops_are_counted_for_each_pass() -> None:
    model, inputs = models.example("mlp", batch=32)
    traced = pipec.trace(model, inputs, method="fx")
    analytic = pipec.load_cost_model("h100-sxm")
    counts = analytic.count(traced)
    first = True
    for info in traced.nodes:
        if info.op != "call_module" or not info.param_bytes:
            continue
        module = traced.graph_module.get_submodule(info.target)
        macs = 32 * module.in_features * module.out_features
        count = counts[info.name]
        assert count.forward.flops == 2 * macs
        assert count.weight_grad.flops == 2 * macs
        assert count.input_grad.flops == (0 if first else 2 * macs)  # no grad for the micro-batch
        first = False
    costs = analytic.node_costs(traced)
    assert set(costs) == {n.name for n in traced.nodes}
    relu = next(n for n in traced.nodes if n.op == "call_module" and not n.param_bytes)
    assert costs[relu.name].weight_grad_time == 0 and costs[relu.name].saved_bytes == relu.output_bytes


def test_gpt2_matmuls_dominate_and_backward_costs_more(gpt2: pipec.TracedGraph) -> None:
    # a compute-bound device (no launch overhead) so the ranking shows the FLOPs
    analytic = pipec.load_cost_model("h100-sxm", kernel_launch_overhead=0.0, memory_bandwidth=1e15)
    costs = analytic.node_costs(gpt2)
    by_kind: dict[str, float] = {}
    for info in gpt2.nodes:
        kind = "matmul" if info.target.endswith(("mm.default", "addmm.default")) else "other"
        by_kind[kind] = by_kind.get(kind, 0.0) + costs[info.name].total_time
    assert by_kind["matmul"] > 3 * by_kind["other"]
    forward = sum(c.forward_time for c in costs.values())
    backward = sum(c.backward_time for c in costs.values())
    assert 1.5 * forward < backward < 2.5 * forward
    counts = analytic.count(gpt2)
    flops = sum(c.forward.flops for c in counts.values())
    params = sum(p.numel for p in gpt2.params.values() if not p.is_buffer)
    tokens = 2 * 16
    assert flops >= 2 * params * tokens * 0.5  # ~2 FLOPs per parameter per token


def test_faster_hardware_is_faster_and_dtype_matters(gpt2: pipec.TracedGraph) -> None:
    def total(model: AnalyticCostModel) -> float:
        return sum(c.total_time for c in model.node_costs(gpt2).values())

    # tiny kernels are launch-bound everywhere; compare the rooflines alone
    no_launch = {"kernel_launch_overhead": 0.0}
    h100, a100 = (pipec.load_cost_model(n, **no_launch) for n in ("h100-sxm", "a100-sxm-80gb"))
    cpu = pipec.load_cost_model("cpu", **no_launch)
    assert total(h100) < total(a100) < total(cpu)
    compute_bound = {"kernel_launch_overhead": 0.0, "memory_bandwidth": 1e16}
    fp32 = total(pipec.load_cost_model("h100-sxm", **compute_bound))
    bf16 = total(pipec.load_cost_model("h100-sxm", dtype="bf16", **compute_bound))
    assert bf16 == pytest.approx(fp32 * 6.7e13 / 9.895e14, rel=0.05)


def test_saved_bytes_are_estimated_on_fake_tensors(gpt2: pipec.TracedGraph) -> None:
    analytic = pipec.load_cost_model("cpu")
    saved = {n: c.saved_bytes for n, c in analytic.node_costs(gpt2).items()}
    measured = pipec.profile(gpt2, repeats=1, warmup=0, progress=False)
    assert saved == {n: c.saved_bytes for n, c in measured.nodes.items()}
    assert sum(saved.values()) > 0


def test_counting_is_cached_and_protocol_shaped(gpt2: pipec.TracedGraph) -> None:
    analytic = pipec.load_cost_model("cpu")
    assert isinstance(analytic, pipec.CostModel)
    first = analytic.node_costs(gpt2)
    assert analytic.node_costs(gpt2) == first
    assert analytic.memory_capacity == analytic.spec.memory_capacity
    assert torch.is_grad_enabled()
