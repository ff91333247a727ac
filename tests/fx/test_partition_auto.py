"""The auto-planner: schedule / num_microbatches / stages_per_rank = "auto" keeps the
fastest simulated configuration that fits memory, and lists every candidate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from models import example

import pipec
from pipec.errors import ConfigError, PartitionError
from pipec.partitioner.single import partition_traced
from pipec.plan import Candidate, PlanData
from pipec.schedule.gen_common import stage_depths
from pipec.schedule.generators import SCHEDULE_NAMES
from pipec.schedule.simulator import simulate_plan
from pipec.types import NodeCost, TracedGraph

BATCH = 8
RANKS = 2


class StepCost:
    """Test cost model: a fixed cost per node (so fewer, larger micro-batches are
    faster) plus one per byte; activations large enough to dominate memory."""

    name = "step-cost"
    memory_capacity = None

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        out = {}
        for n in traced.nodes:
            busy = n.op not in ("placeholder", "get_attr", "output")
            work = 2e-6 + n.output_bytes * 1e-9 if busy else 0.0
            out[n.name] = NodeCost(forward_time=work, input_grad_time=work, weight_grad_time=work / 2,
                                   saved_bytes=n.output_bytes * 256 if busy else 0)
        return out

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else 1e-6 + num_bytes * 1e-11


Key = tuple[str, int, int]


def auto_plan(name: str = "mlp", **kwargs: Any) -> pipec.Plan:
    model, inputs = example(name, BATCH)
    args: dict[str, Any] = dict(num_stages=RANKS, schedule="auto", num_microbatches="auto",
                                cost_model=StepCost())
    args.update(kwargs)
    return pipec.partition(model, inputs, **args)


def key(c: Candidate) -> Key:
    return (c.schedule, c.num_microbatches, c.stages_per_rank)


def direct(name: str, configs: list[Key], memory_limit: Any = None) -> dict[Key, float | None]:
    """Partition and simulate each configuration on its own: step time, None when it
    does not fit. Independent of pipec.partitioner.auto: slices the batch itself."""
    model, inputs = example(name, BATCH)
    cost = StepCost()
    out: dict[Key, float | None] = {}
    for schedule, m, v in configs:
        traced = pipec.trace(model, tuple(x[: BATCH // m] for x in inputs))
        try:
            plan = partition_traced(traced, cost.node_costs(traced), num_stages=RANKS * v, num_microbatches=m,
                                    schedule=schedule, stages_per_rank=v, cost_model=cost,
                                    memory_limit=memory_limit)
        except PartitionError:
            out[(schedule, m, v)] = None
            continue
        out[(schedule, m, v)] = simulate_plan(plan).step_time
    return out


def chosen(plan: pipec.Plan) -> Key:
    return (plan.schedule.name, plan.num_microbatches, plan.data.stages_per_rank)


def test_picks_the_fastest_candidate_and_agrees_with_a_direct_loop() -> None:
    plan = auto_plan()
    cands = plan.data.candidates
    expected = {(s, m, 1) for s in ("gpipe", "1f1b", "zb-h1", "zb-h2", "synth") for m in (1, 2, 4, 8)}
    assert {key(c) for c in cands} == expected and len(cands) == len(expected)
    assert all(c.fits for c in cands)
    best = min(cands, key=lambda c: c.step_time)
    assert key(cands[0]) == chosen(plan) == key(best)
    for a, b in zip(cands, cands[1:]):  # by step time; equal times (to 9 digits) by peak memory
        assert a.step_time <= b.step_time * (1 + 1e-9)
        if b.step_time <= a.step_time * (1 + 1e-9):
            assert max(a.peak_memory) <= max(b.peak_memory)
    assert cands[0].note.startswith("chosen") and all("slower" in c.note or "as fast" in c.note for c in cands[1:])
    times = direct("mlp", sorted(expected))
    assert {k: pytest.approx(t) for k, t in times.items()} == {key(c): c.step_time for c in cands}
    fastest = min(times, key=lambda k: times[k] or 0.0)
    assert times[fastest] == pytest.approx(plan.simulate().step_time)
    assert chosen(plan) == fastest or times[chosen(plan)] == pytest.approx(times[fastest])
    # each micro-batch size was traced on its own: the boundary shapes are per micro-batch
    assert plan.data.batch_size == BATCH
    assert all(b.shape[0] == BATCH // plan.num_microbatches for b in plan.boundaries)


def test_a_memory_limit_that_excludes_the_fastest_picks_the_next() -> None:
    free = auto_plan(stages_per_rank=1)
    fastest = free.data.candidates[0]
    small = min(free.data.candidates, key=lambda c: max(c.peak_memory))
    limit = max(small.peak_memory)
    assert limit < max(fastest.peak_memory), "precondition: the memory needs must differ"
    plan = auto_plan(stages_per_rank=1, memory_limit=limit)
    cands = {key(c): c for c in plan.data.candidates}
    assert not cands[key(fastest)].fits and "needs" in cands[key(fastest)].note
    assert cands[key(small)].fits
    fitting = [c for c in plan.data.candidates if c.fits]
    assert chosen(plan) == key(fitting[0]) == key(min(fitting, key=lambda c: c.step_time))
    assert chosen(plan) != key(fastest)
    assert all(max(c.peak_memory) <= limit for c in fitting)
    assert plan.data.candidates[: len(fitting)] == tuple(fitting)  # fitting first
    times = direct("mlp", sorted(cands), memory_limit=limit)
    assert {k for k, t in times.items() if t is not None} == {key(c) for c in fitting}
    best = min((k for k, t in times.items() if t is not None), key=lambda k: times[k] or 0.0)
    assert times[best] == pytest.approx(cands[chosen(plan)].step_time)


def test_no_candidate_fits() -> None:
    with pytest.raises(PartitionError, match=r"none of the 20 configurations fits the memory limit "
                       r"\(1\.0 KiB per rank\).*closest is .* which needs .*raise memory_limit"):
        auto_plan(stages_per_rank=1, memory_limit="1KiB")


def test_stages_per_rank_auto_keeps_the_ranks_and_tries_interleaving() -> None:
    plan = auto_plan(schedule="interleaved-1f1b", num_microbatches=4, stages_per_rank="auto")
    assert {key(c) for c in plan.data.candidates} == {("interleaved-1f1b", 4, 2), ("interleaved-1f1b", 4, 4)}
    assert plan.num_ranks == RANKS and plan.num_stages == RANKS * plan.data.stages_per_rank
    plan = auto_plan(schedule="auto", num_microbatches=2, stages_per_rank="auto")
    # each schedule at the depths it takes (V schedules and synth: 2; interleaved: 2 and 4);
    # dualpipe-v needs m >= num_stages = 4, so with m = 2 it is left out
    assert {key(c) for c in plan.data.candidates} == {
        (s, 2, v) for s in SCHEDULE_NAMES if s != "dualpipe-v" for v in stage_depths(s, (2, 4))}
    assert plan.num_ranks == RANKS


def test_summary_lists_the_candidates_and_why_the_winner_won() -> None:
    plan = auto_plan("two_input", cost_model="h100-sxm", num_microbatches=4)
    text = plan.summary()
    assert "auto-plan candidates" in text and "stages/rank" in text and "bubble" in text
    for c in plan.data.candidates:
        assert c.schedule in text
    best, runner = plan.data.candidates[:2]
    assert f"chosen: {best.schedule} m=4: fastest of 5 candidates that fit" in text
    assert f"next {runner.schedule} m=4 is" in text
    assert "auto-plan candidates" not in pipec.partition(*example("mlp", BATCH), num_stages=2,
                                                         cost_model=StepCost()).summary()
    # candidates survive plan.json
    assert PlanData.model_validate_json(plan.data.model_dump_json()).candidates == plan.data.candidates


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_microbatches="many"), r"num_microbatches: expected a whole number or 'auto', found 'many'"),
        (dict(stages_per_rank="lots"), r"stages_per_rank: expected a whole number or 'auto'"),
        (dict(schedule="fastest"), r"schedule: expected one of .*synth or 'auto', found 'fastest'"),
        (dict(schedule="1f1b", stages_per_rank=2), r"no configuration to try"),
        (dict(num_microbatches=3), r"does not divide the batch"),
        (dict(num_stages=0), r"num_stages: expected >= 1"),
        (dict(device_speeds=[1.0]), r"device_speeds: expected 2 values"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        auto_plan(**kwargs)


def test_no_tensor_inputs_means_one_microbatch() -> None:
    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self) -> torch.Tensor:
            out: torch.Tensor = self.b(torch.relu(self.a(torch.ones(2, 4))))
            return out

    plan = pipec.partition(Constant(), (), num_stages=2, schedule="auto", num_microbatches="auto",
                           cost_model=StepCost())
    assert {c.num_microbatches for c in plan.data.candidates} == {1}


def test_configurations_that_cannot_be_split_are_left_out() -> None:
    # the MLP has 9 compute nodes: 4 ranks x 2 stages can be split, 4 x 4 cannot
    plan = auto_plan(num_stages=4, schedule="interleaved-1f1b", num_microbatches=4, stages_per_rank="auto")
    assert [key(c) for c in plan.data.candidates] == [("interleaved-1f1b", 4, 2)]
    assert plan.data.candidates[0].note == "chosen: the only fit"
    with pytest.raises(PartitionError, match=r"none of the 2 configurations could be split.*found 16"):
        auto_plan(num_stages=8, schedule="interleaved-1f1b", num_microbatches=4, stages_per_rank="auto")
