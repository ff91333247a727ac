"""A V-shaped placement (issue #14): stage ``s`` on rank ``s`` for ``s < p``, on ``2p - 1 - s`` after.

Placement is data on the schedule (``Schedule.placement``, ``Schedule.rank_of``):
every phase -- the partitioner's memory and stage ranks, lowering, the validator,
the simulator, plan.json, the runtime -- reads it there. Here a hand-written
V-shaped schedule (two ranks, four stages: rank 0 runs stages 0 and 3, rank 1
stages 1 and 2) is validated, lowered for both backends, simulated, saved and
loaded, and run through the executor -- in one process and on two Gloo ranks --
with gradients equal to the whole-batch reference.
"""

from __future__ import annotations

import json
from pathlib import Path
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
from pipec.schedule.ir import ActionKind, Schedule, v_placement
from pipec.schedule.lowering import lower
from pipec.schedule.validator import validate
from pipec.types import NodeCost, TracedGraph

# rank 0 holds stages 0 and 3 (the V's two ends), rank 1 stages 1 and 2 (its point)
V_TEXT = """
0: 0F0 0F1 3F0 3B0 3F1 3B1 0B0 0B1
1: 1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1
"""
# the same with the backward split into I and W (zero-bubble style)
V_SPLIT_TEXT = """
0: 0F0 0F1 3F0 3I0 3F1 3I1 3W0 3W1 0I0 0I1 0W0 0W1
1: 1F0 2F0 1F1 2F1 2I0 1I0 2I1 1I1 2W0 2W1 1W0 1W1
"""


def v_schedule(text: str = V_TEXT) -> Schedule:
    return Schedule.from_text(text, name="v-hand", stages_per_rank=2, placement=v_placement(4, 2))


@pytest.fixture(scope="module")
def chain() -> tuple[nn.Module, TracedGraph, torch.Tensor, torch.Tensor]:
    return chain_case(2)


def _plan(traced: TracedGraph, schedule: Schedule) -> Plan:
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}
    data = plan_from_split(traced, costs, ["b", "c", "d"], schedule=schedule, num_microbatches=2, stages_per_rank=2)
    return Plan(data, traced=traced, loss_fn=F.mse_loss)


def test_v_placement_is_data_on_the_schedule() -> None:
    sched = v_schedule()
    assert sched.placement == (0, 1, 1, 0)
    assert [sched.rank_of(s) for s in range(4)] == [0, 1, 1, 0]
    assert sched.stages_of(0) == (0, 3) and sched.stages_of(1) == (1, 2)
    # round-trips through JSON; a schedule saved without a placement is round-robin
    assert Schedule.model_validate_json(sched.model_dump_json()) == sched
    raw = json.loads(sched.model_dump_json())
    del raw["placement"]
    assert Schedule.model_validate(raw).placement == (0, 1, 0, 1)


@pytest.mark.parametrize("text", [V_TEXT, V_SPLIT_TEXT], ids=["B", "I-W"])
def test_v_schedule_validates_and_lowers(text: str) -> None:
    sched = v_schedule(text)
    validate(sched)
    for pair_order in (True, False):
        lowered = lower(sched, match_pair_order=pair_order)
        validate(lowered, check_pair_order=pair_order)
        assert lowered.placement == sched.placement
        # stage 3 on rank 0 receives from stage 2 on rank 1; stage 0 -> 1 crosses too; 2 -> 3 and back
        recv = {str(a) for a in lowered.actions[0] if a.kind is ActionKind.RECV_F}
        assert recv == {"3RECV_F0", "3RECV_F1"}
        # stages 1 and 2 share rank 1: stage 1 sends nothing forward, stage 2 sends to rank 0
        assert {str(a) for a in lowered.actions[1] if a.kind is ActionKind.SEND_F} == {"2SEND_F0", "2SEND_F1"}


def test_the_v_wrongly_placed_is_refused() -> None:
    # the same actions under round-robin placement put stage 3 on rank 1: refused, with the fix
    wrong = Schedule.from_text(V_TEXT, name="v-hand", stages_per_rank=2)
    with pytest.raises(pipec.ScheduleError, match="belongs on rank 1"):
        validate(wrong)


def test_v_plan_places_simulates_and_saves(chain: Any, tmp_path: Path) -> None:
    _, traced, _, _ = chain
    plan = _plan(traced, v_schedule())
    assert [st.rank for st in plan.stages] == [0, 1, 1, 0]
    sim = plan.simulate()
    assert {e.action.stage for e in sim.timeline if e.rank == 0 and e.action.kind.is_compute} == {0, 3}
    plan.save(tmp_path / "plan")
    loaded = pipec.load(tmp_path / "plan")
    assert loaded.schedule.placement == (0, 1, 1, 0)
    assert loaded.simulate().step_time == pytest.approx(sim.step_time)


@pytest.mark.parametrize("source", ["memory", "saved"])
@pytest.mark.parametrize("text", [V_TEXT, V_SPLIT_TEXT], ids=["B", "I-W"])
def test_v_plan_gradients_in_one_process(chain: Any, text: str, source: str, tmp_path: Path) -> None:
    model, traced, x, target = chain
    plan = _plan(traced, v_schedule(text))
    if source == "saved":
        plan = pipec.load(plan.save(tmp_path / "plan"))
        assert plan.schedule.placement == (0, 1, 1, 0)
    assert_grads(step_grads(one_rank(plan), x, target), reference_grads(model, x, target), f"one rank, {source}")


def _gloo(rank: int, world_size: int, plans: dict[str, Plan | str], x: Any, target: Any) -> dict[str, Any]:
    return {key: step_grads(plan, x, target) for key, plan in plans.items()}


def test_v_plan_gradients_on_two_gloo_ranks(chain: Any, tmp_path: Path) -> None:
    model, traced, x, target = chain
    plans: dict[str, Plan | str] = {
        "B": _plan(traced, v_schedule(V_TEXT)), "I-W": _plan(traced, v_schedule(V_SPLIT_TEXT)),
        # each rank loads the saved directory: the V placement comes from plan.json
        "I-W/saved": str(_plan(traced, v_schedule(V_SPLIT_TEXT)).save(tmp_path / "plan")),
    }
    per_rank = run_ranks(_gloo, 2, plans, x, target, timeout=180)
    want = reference_grads(model, x, target)
    for key in plans:
        got: dict[str, torch.Tensor] = {}
        for r in per_rank:
            got.update(r[key])
        assert_grads(got, want, f"two gloo ranks, {key}")


def test_partition_takes_a_v_shaped_schedule(chain: Any, tmp_path: Path) -> None:
    model, _, x, target = chain
    plan = pipec.partition(model, (x,), num_stages=4, schedule=v_schedule(V_SPLIT_TEXT), stages_per_rank=2,
                           loss_fn=F.mse_loss, target=target, cost_model="h100-sxm")
    assert plan.num_microbatches == 2  # the schedule's
    assert plan.schedule.placement == (0, 1, 1, 0)
    assert [st.rank for st in plan.stages] == [0, 1, 1, 0]
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    assert plan.simulate().schedule.placement == (0, 1, 1, 0)
    assert_grads(step_grads(one_rank(plan), x, target), reference_grads(model, x, target), "partitioned V")
    with pytest.raises(pipec.ConfigError, match="fixes num_microbatches"):
        pipec.partition(model, (x,), num_stages=4, schedule=v_schedule(), stages_per_rank=2,
                        num_microbatches="auto", cost_model="h100-sxm")
    with pytest.raises(pipec.ConfigError, match="found num_stages=4, num_microbatches=2"):
        pipec.partition(model, (x,), num_stages=4, schedule=v_schedule(), stages_per_rank=2,
                        num_microbatches=4, cost_model="h100-sxm")
