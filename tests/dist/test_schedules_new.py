"""Issue #17's schedules through the one executor: zb-h2, interleaved-zb, zb-v, dualpipe-v and
synth (built at partition time from the split's costs, one stage per rank and in a V).

Each plan runs one training step on two Gloo ranks (and synth's also in one process) with
gradients equal to the single-process, whole-batch reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _chain import assert_grads, chain_case, reference_grads, step_grads
from _one_rank import one_rank
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.types import NodeCost, TracedGraph

M = 4  # dualpipe-v needs m >= num_stages = 4


@pytest.fixture(scope="module")
def chain() -> tuple[nn.Module, TracedGraph, torch.Tensor, torch.Tensor]:
    return chain_case(M)


def _plan(traced: TracedGraph, schedule: str, spr: int) -> Plan:
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}
    split = ["c"] if spr == 1 else ["b", "c", "d"]
    data = plan_from_split(traced, costs, split, schedule=schedule, num_microbatches=M, stages_per_rank=spr)
    return Plan(data, traced=traced, loss_fn=F.mse_loss)


def _synth(model: nn.Module, x: torch.Tensor, target: torch.Tensor, spr: int) -> Plan:
    plan = pipec.partition(model, (x,), num_stages=2 * spr, num_microbatches=M, schedule="synth",
                           stages_per_rank=spr, loss_fn=F.mse_loss, target=target, cost_model="h100-sxm")
    assert plan.schedule.name == "synth"
    assert plan.schedule.placement == ((0, 1) if spr == 1 else (0, 1, 1, 0))
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    return plan


def _gloo(rank: int, world_size: int, plans: dict[str, Plan], x: Any, target: Any) -> dict[str, Any]:
    return {key: step_grads(plan, x, target) for key, plan in plans.items()}


def test_new_schedules_gradients_on_two_gloo_ranks(chain: Any) -> None:
    model, traced, x, target = chain
    plans = {
        "zb-h2": _plan(traced, "zb-h2", 1),
        "interleaved-zb": _plan(traced, "interleaved-zb", 2),
        "zb-v": _plan(traced, "zb-v", 2),
        "dualpipe-v": _plan(traced, "dualpipe-v", 2),
        "synth": _synth(model, x, target, 1),
        "synth-v": _synth(model, x, target, 2),
    }
    assert plans["zb-v"].schedule.placement == (0, 1, 1, 0)
    assert [st.rank for st in plans["dualpipe-v"].stages] == [0, 1, 1, 0]
    per_rank = run_ranks(_gloo, 2, plans, x, target, timeout=180)
    want = reference_grads(model, x, target)
    for key in plans:
        got: dict[str, torch.Tensor] = {}
        for r in per_rank:
            got.update(r[key])
        assert_grads(got, want, f"two gloo ranks, {key}")


@pytest.mark.parametrize("spr", [1, 2])
def test_synth_plan_in_one_process_and_saved(chain: Any, spr: int, tmp_path: Any) -> None:
    model, _, x, target = chain
    plan = _synth(model, x, target, spr)
    sim = plan.simulate()
    assert sim.schedule.compute_only().actions == plan.schedule.actions
    loaded = pipec.load(plan.save(tmp_path / "plan"))
    assert loaded.schedule == plan.schedule
    assert loaded.simulate().step_time == pytest.approx(sim.step_time)
    assert_grads(step_grads(one_rank(loaded), x, target), reference_grads(model, x, target), f"one rank, synth v={spr}")
