"""The memory terms the plan predicts beyond activations and parameters, as the runtime
holds them: receive buffers per micro-batch, Gloo's sends held to the step's end, and the
prediction per backend (pure, no processes)."""

from __future__ import annotations

import torch
from torch import nn

import pipec
from pipec.partitioner.assemble import gloo_extra_bytes, plan_from_split
from pipec.partitioner.chain import stage_memory
from pipec.partitioner.problem import ChainProblem, ChainTensor, ParamGroup
from pipec.plan import Boundary, StageInfo
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.types import NodeCost


def _boundary(producer: int, consumers: tuple[int, ...], num_bytes: int, dtype: str = "float32") -> Boundary:
    return Boundary(name=f"t{producer}", producer_stage=producer, consumer_stages=consumers, shape=(num_bytes // 4,),
                    dtype=dtype, num_bytes=num_bytes)


def _stage(memory: int, gloo: int | None) -> StageInfo:
    return StageInfo(index=0, rank=0, nodes=("a",), num_params=0, param_bytes=0, forward_time=0.0,
                     backward_time=0.0, comm_time=0.0, memory_bytes=memory, gloo_memory_bytes=gloo)


def test_gloo_holds_every_sent_tensor_and_every_gradient_sent_back() -> None:
    # stages 0, 1, 2 on ranks 0, 1, 1; 4 micro-batches, 2 / 1 / 1 in flight
    rank_of = {0: 0, 1: 1, 2: 1}.__getitem__
    extra = gloo_extra_bytes([_boundary(0, (1,), 40), _boundary(1, (2,), 400)], rank_of, 3, 4, (2, 1, 1))
    # stage 0 sends 40 bytes per micro-batch: 4 held, 2 of them already counted in flight;
    # stage 1 sends the gradient of what it received back, 4 of them; the same-rank edge 1 -> 2 holds nothing
    assert extra == [40 * 2, 40 * 4, 0]


def test_an_integer_tensor_has_no_gradient_to_send_back() -> None:
    extra = gloo_extra_bytes([_boundary(0, (1,), 32, dtype="int64")], lambda s: s, 2, 4, (2, 1))
    assert extra == [32 * 2, 0]


def test_memory_on_picks_the_backend() -> None:
    st = _stage(100, 130)
    assert st.memory_on("nccl") == st.memory_on("cpu:gloo,cuda:nccl") == 100
    assert st.memory_on("gloo") == st.memory_on(None) == 130
    assert _stage(100, None).memory_on("gloo") == 100  # a plan saved before it was stored


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layers(x))


def _plan(num_microbatches: int) -> pipec.Plan:
    torch.manual_seed(0)
    model = _MLP()
    traced = pipec.trace(model, (torch.randn(4, 32),))  # one micro-batch's shapes
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4, saved_bytes=64,
                              output_bytes=64) for n in traced.nodes}
    data = plan_from_split(traced, costs, [2], num_microbatches=num_microbatches, schedule="1f1b")
    return pipec.Plan(data, traced=traced)


def test_plan_stores_the_gloo_figure_and_counts_receive_buffers_per_microbatch() -> None:
    plan = _plan(4)
    data = plan.data
    flight = in_flight_from_schedule(data.schedule)
    extra = gloo_extra_bytes(data.boundaries, data.schedule.rank_of, 2, 4, flight)
    assert [st.gloo_memory_bytes for st in plan.stages] == [st.memory_bytes + e for st, e in zip(plan.stages, extra)]
    (b,) = data.boundaries
    assert extra == [b.num_bytes * (4 - flight[0]), b.num_bytes * 4]
    # one more micro-batch: the last stage (1 in flight) gains one input buffer, the first one
    # gradient buffer (2 in flight either way)
    more = _plan(5)
    assert [m.memory_bytes - p.memory_bytes for m, p in zip(more.stages, plan.stages)] == [b.num_bytes] * 2


def _chain(**kw: object) -> ChainProblem:
    base: dict[str, object] = dict(
        compute_time=(1.0,) * 4, num_stages=2, saved_bytes=(0,) * 4, tensors=(ChainTensor(1, (2,), 10),),
        schedule="1f1b", num_microbatches=4, in_flight=(2, 1), output_bytes=(0, 0, 0, 30),
        params=(ParamGroup(100, 25, (0,)), ParamGroup(200, 50, (3,))), optimizer_state_bytes_per_param=0,
    )
    base.update(kw)
    return ChainProblem(**base)  # type: ignore[arg-type]


def test_the_last_stage_holds_the_loss_gradient_twice() -> None:
    p = _chain()
    # stage 1: params + grads 400, its input 10 in a buffer per micro-batch (4), loss gradient 2 x 30
    assert stage_memory(p, 1, 2, 4) == 2 * 200 + 10 * 4 + 2 * 30
    # stage 0: params + grads 200, its output while in flight (2), its gradient per micro-batch (4)
    assert stage_memory(p, 0, 0, 2) == 2 * 100 + 10 * 2 + 10 * 4


def test_a_split_backward_stage_computes_its_weight_gradients_at_once() -> None:
    plain, split = _chain(), _chain(held_grads=(2, 2), matmul=(False,) * 4)
    assert stage_memory(split, 1, 2, 4) == stage_memory(plain, 1, 2, 4) + 200  # one more copy of its weights
    assert stage_memory(split, 0, 0, 2) == stage_memory(plain, 0, 0, 2)  # the first stage's W is a plain backward


def test_the_simulator_holds_a_recomputing_backward_s_replayed_activations() -> None:
    one = dict(forward=1.0, input_grad=1.0, weight_grad=1.0, activation_bytes=(10, 20))
    plain = pipec.simulate(pipec.make_schedule("1f1b", 2, 1), **one)  # type: ignore[arg-type]
    replayed = pipec.simulate(pipec.make_schedule("1f1b", 2, 1), replay_bytes=(100, 300), **one)  # type: ignore[arg-type]
    assert plain.peak_memory == (10, 20)
    assert replayed.peak_memory == (110, 320)
    # split backward: from the start of I to the end of W; ZB-H1's rank 1 holds two micro-batches then
    zb = pipec.simulate(pipec.make_schedule("zb-h1", 2, 4), replay_bytes=(0, 300), **one)  # type: ignore[arg-type]
    # rank 1 runs F0 I0 F1 I1 W0 ...: during I1, micro-batches 0 and 1 both hold their replay
    assert zb.peak_memory[1] == 2 * (20 + 300)


def test_plan_replay_bytes_is_what_recompute_drops() -> None:
    from pipec.schedule.simulator import plan_replay_bytes

    plan = _plan(4)
    assert plan_replay_bytes(plan.data) == (0.0, 0.0)  # no recompute
    torch.manual_seed(0)
    model = _MLP()
    traced = pipec.trace(model, (torch.randn(4, 32),))
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4, saved_bytes=64,
                              output_bytes=64) for n in traced.nodes}
    data = plan_from_split(traced, costs, [2], num_microbatches=4, schedule="1f1b", recompute="full")
    want = tuple(float(sum(costs[n].saved_bytes for n in st.nodes)) for st in data.stages)
    assert plan_replay_bytes(data) == want
    assert pipec.Plan(data, traced=traced).simulate().peak_memory[0] > 0


def test_summary_and_report_show_both_predictions_where_gloo_differs() -> None:
    from pipec.viz.report_compare import memory_comparison

    data = _plan(4).data
    nccl = [sum(st.memory_on("nccl") for st in data.stages if st.rank == r) for r in range(2)]
    gloo = [sum(st.memory_on("gloo") for st in data.stages if st.rank == r) for r in range(2)]
    assert gloo[0] > nccl[0] and gloo[1] > nccl[1]
    summary = pipec.Plan(data).summary(measured={0: gloo[0], 1: gloo[1]})
    assert "(NCCL; Gloo holds its sends to the step's end)" in summary
    assert "Gloo 1.00x" in summary
    html = memory_comparison(data, {0: gloo[0], 1: gloo[1]})
    assert "predicted (Gloo)" in html and "predicted (NCCL)" in html and "1.00\u00d7" in html
