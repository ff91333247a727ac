"""Activation recompute at run time: ``full`` and ``selective`` give the same losses and
gradients, bit for bit, as no recompute, on 2 Gloo ranks, under 1F1B, interleaved 1F1B
and ZB-H1 (whose I/W split runs on the replayed graph), on a plain model with dropout
(pipec's seeded draws replay identically) and an HF GPT-2; and the memory the runtime
measures is reported with the plan's prediction and each stage's policy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.partitioner.graph import compute_names
from pipec.runtime.runtime import PipelineRuntime
from pipec.types import NodeCost, TracedGraph

MODES = ("none", "full", "selective")
SCHEDULES = [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)]


class DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(torch.tanh(layer(x))) + x
        return self.head(x)


def _gpt2_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


def _costs(traced: TracedGraph) -> dict[str, NodeCost]:
    return {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4, saved_bytes=64,
                             output_bytes=64) for n in traced.nodes}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(0)
    if name == "mlp":
        return DropMLP().train(), torch.randn(8, 16), torch.randn(8, 3), F.mse_loss
    from models import gpt2

    return gpt2(num_layers=2), torch.randint(0, 128, (8, 16)), torch.randint(0, 128, (8, 16)), _gpt2_loss


def _worker(rank: int, world: int, plans: list[Plan], x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> Any:
    out = []
    for plan in plans:
        pipe = PipelineRuntime(plan, loss_fn, seed=7, track_memory=True)
        loss = pipe.step(x, target=y)
        stats = pipe.memory_stats()
        out.append((loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}, stats))
        pipe.close()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
@pytest.mark.parametrize("schedule,spr", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_recompute_gradients_equal_no_recompute(model_name: str, schedule: str, spr: int) -> None:
    model, x, y, loss_fn = _case(model_name)
    traced = pipec.trace(model, (x[:2],))
    names = compute_names(traced)
    num_stages = 2 * spr
    cuts = [len(names) * k // num_stages for k in range(1, num_stages)]
    plans = []
    for mode in MODES:
        data = plan_from_split(traced, _costs(traced), cuts, schedule=schedule, num_microbatches=4,
                               stages_per_rank=spr, recompute=mode)
        assert {st.recompute for st in data.stages} == {mode} and data.recompute == mode
        plans.append(Plan(data, traced=traced, loss_fn=loss_fn))
    results = run_ranks(_worker, 2, plans, x, y, loss_fn, timeout=100)
    for rank, runs in enumerate(results):
        (loss0, grads0, _), *others = runs
        assert grads0
        for mode, (loss, grads, stats) in zip(MODES[1:], others):
            assert (loss is None) == (loss0 is None)
            if loss is not None:
                assert torch.equal(loss, loss0), f"{mode}: loss"
            assert set(grads) == set(grads0)
            for n in grads0:
                assert torch.equal(grads[n], grads0[n]), f"{schedule} {mode} rank {rank}: {n}"
            assert set(stats.recompute.values()) == {mode} and stats.rank == rank
            assert stats.peak_bytes > stats.model_state_bytes > 0 and stats.predicted_bytes > 0


def test_saved_plan_keeps_the_policy(tmp_path: Any) -> None:
    model, x, _, loss_fn = _case("mlp")
    traced = pipec.trace(model, (x[:2],))
    data = plan_from_split(traced, _costs(traced), [len(compute_names(traced)) // 2], num_microbatches=4,
                           recompute="selective")
    loaded = pipec.load(Plan(data, traced=traced, loss_fn=loss_fn).save(tmp_path / "plan"))
    assert [st.recompute for st in loaded.stages] == ["selective", "selective"]
    assert loaded.data.recompute == "selective"


def test_measured_memory_reaches_the_timeline_summary_and_report(tmp_path: Any) -> None:
    """One rank (every stage local): memory_stats() is measured, saved with the timeline,
    read back by the report beside the prediction, and shown in the summary."""
    from _one_rank import one_rank

    from pipec.viz.report import render_report
    from pipec.viz.report_measured import load_measured

    model, x, y, loss_fn = _case("mlp")
    traced = pipec.trace(model, (x[:2],))
    data = plan_from_split(traced, _costs(traced), [len(compute_names(traced)) // 2], num_microbatches=4,
                           recompute="full")
    plan = one_rank(Plan(data, traced=traced, loss_fn=loss_fn))
    pipe = PipelineRuntime(plan, loss_fn, track_memory=True)
    with pytest.raises(pipec.PipecError, match="no training step measured yet"):
        pipe.memory_stats()
    pipe.step(x, target=y)
    stats = pipe.memory_stats()
    assert stats.recompute == {0: "full", 1: "full"} and stats.source == "cpu"
    assert stats.peak_bytes == stats.model_state_bytes + stats.step_peak_bytes
    pipe.save_timeline(tmp_path / "timeline_rank0.json")
    measured = load_measured(tmp_path)
    assert measured is not None and measured.memory == {0: stats.peak_bytes}
    html = render_report(plan.data, measured=measured)
    assert "Memory per rank" in html and "0: full" in html
    summary = plan.summary(measured={0: stats.peak_bytes})
    assert "measured" in summary and "full" in summary
    untracked = PipelineRuntime(plan, loss_fn)
    untracked.step(x, target=y)
    with pytest.raises(pipec.PipecError, match="track_memory=True"):
        untracked.memory_stats()


class Opaque(nn.Module):
    """Kept as one leaf module by the tracer: its dropout is not one of pipec's seeded
    nodes, so it draws from the global generator, which the replay must rewind."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        if y.sum() > -1e30:  # data-dependent: fx cannot trace into it, so the stage keeps it opaque
            y = self.drop(y)
        return y


class NormAndOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Opaque(), Opaque()
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.b(self.a(x))))


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_global_random_state_and_buffers_replay_as_without_recompute(schedule: str) -> None:
    """Unseeded dropout (a leaf module) draws the same masks in the replay, and BatchNorm's
    running statistics are updated once per micro-batch, as without recompute."""
    import warnings

    from _one_rank import one_rank

    torch.manual_seed(0)
    model = NormAndOpaque().train()
    x, y = torch.randn(8, 16), torch.randn(8, 3)
    traced = pipec.trace(model, (x[:2],), leaf_modules=[Opaque])
    cut = [compute_names(traced).index("b")]
    runs = []
    for mode in MODES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch norm per micro-batch: the same in every mode
            data = plan_from_split(traced, _costs(traced), cut, schedule=schedule, num_microbatches=4,
                                   recompute=mode)
        pipe = PipelineRuntime(one_rank(Plan(data, traced=traced, loss_fn=F.mse_loss)), F.mse_loss, seed=3)
        torch.manual_seed(11)
        loss = pipe.step(x, target=y)
        after = torch.rand(1)  # the global generator is left where no recompute leaves it
        buffers = {n: b.clone() for m in pipe.stage_modules.values() for n, b in m.named_buffers()}
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        runs.append((loss, after, buffers, grads))
    (loss0, after0, buffers0, grads0), *others = runs
    for mode, (loss, after, buffers, grads) in zip(MODES[1:], others):
        assert torch.equal(loss, loss0) and torch.equal(after, after0), mode
        assert buffers.keys() == buffers0.keys() and all(torch.equal(buffers[n], buffers0[n]) for n in buffers0)
        assert all(torch.equal(grads[n], grads0[n]) for n in grads0) and grads.keys() == grads0.keys(), mode


def _replica_worker(rank: int, world: int, plans: list[Plan], x: torch.Tensor, y: torch.Tensor,
                    loss_fn: Any) -> Any:
    from pipec.microbatch import replica_share

    out = []
    for plan in plans:
        pipe = PipelineRuntime(plan, loss_fn, seed=7)
        size, d = pipe.data_parallel_size, pipe.data_parallel_rank
        loss = pipe.step(replica_share(x, size, d), target=replica_share(y, size, d))
        out.append((loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None},
                    {n: p.dtype for n, p in pipe.named_parameters()}))
        pipe.close()
    return out


@pytest.mark.timeout(120)
def test_recompute_with_bf16_and_replicas_equals_no_recompute() -> None:
    """The replay runs as the first forward did: under the stage's autocast (bf16), with the
    global micro-batch's seed (replica 1 draws micro-batches M..2M-1), boundaries cast to
    bf16 and the loss scaled the same way: DP2 x PP2, zb-h1, bit for bit."""
    model, x, y, loss_fn = _case("mlp")
    traced = pipec.trace(model, (x[:2],))
    cuts = [len(compute_names(traced)) // 2]
    plans = []
    for mode in MODES:
        data = plan_from_split(traced, _costs(traced), cuts, schedule="zb-h1", num_microbatches=2,
                               precision="bf16", recompute=mode, batch_size=8)
        assert data.boundaries and all(b.dtype == "bfloat16" for b in data.boundaries)
        plans.append(Plan(data.model_copy(update={"data_parallel": 2}), traced=traced, loss_fn=loss_fn))
    results = run_ranks(_replica_worker, 4, plans, x, y, loss_fn, timeout=100)
    for rank, runs in enumerate(results):
        (loss0, grads0, dtypes0), *others = runs
        assert grads0 and set(dtypes0.values()) == {torch.float32}  # fp32 master weights
        for mode, (loss, grads, _) in zip(MODES[1:], others):
            assert (loss is None) == (loss0 is None)
            if loss is not None:
                assert torch.equal(loss, loss0), f"{mode}: loss"
            for n in grads0:
                assert torch.equal(grads[n], grads0[n]), f"{mode} rank {rank}: {n}"


def _fp16_worker(rank: int, world: int, plans: list[Plan], x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> Any:
    out = []
    for plan in plans:
        pipe = PipelineRuntime(plan, loss_fn, seed=7)
        assert pipe.loss_scale > 1.0  # fp16: the loss is scaled, the gradients unscaled after the step
        loss = pipe.step(x, target=y)
        out.append((loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}))
        pipe.close()
    return out


@pytest.mark.timeout(120)
def test_recompute_under_fp16_loss_scaling_equals_no_recompute() -> None:
    """The replayed last stage's loss is scaled as the first run's: under fp16 loss scaling,
    full and selective recompute give the gradients of no recompute, bit for bit."""
    model, x, y, loss_fn = _case("mlp")
    traced = pipec.trace(model, (x[:2],))
    cuts = [len(compute_names(traced)) // 2]
    plans = [Plan(plan_from_split(traced, _costs(traced), cuts, schedule="1f1b", num_microbatches=4,
                                  precision="fp16", recompute=mode), traced=traced, loss_fn=loss_fn)
             for mode in MODES]
    for rank, runs in enumerate(run_ranks(_fp16_worker, 2, plans, x, y, loss_fn, timeout=100)):
        (loss0, grads0), *others = runs
        assert grads0
        for mode, (loss, grads) in zip(MODES[1:], others):
            if loss is not None:
                assert torch.equal(loss, loss0), f"{mode}: loss"
            for n in grads0:
                assert torch.equal(grads[n], grads0[n]), f"fp16 {mode} rank {rank}: {n}"
