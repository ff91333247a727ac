"""Data x pipeline parallelism (issue #15): D replicas of a P-rank pipeline on Gloo.

Every case plans with ``pipec.partition(..., data_parallel=2)`` on the GLOBAL
batch, runs one training step on 4 (or 2) processes -- each rank passing its
replica's share (``pipec.microbatch.replica_share``) -- and compares, for every
parameter on every rank, the gradient with the single-process full-batch
gradient (``loss_fn(model(*batch), target).backward()``), and the reported loss
with the full-batch loss: the replicas' all-reduced gradients and the global
mean loss. Schedules 1f1b, interleaved-1f1b and zb-h1; models: an MLP, a model
with two inputs, a language model whose head is tied to its embedding (tied
group x replicas, reduced once) and GPT-2; both mesh orders; DP2 x PP1 (pure
data parallelism through the same runtime); a ``(loss_sum, count)`` loss (the
global count); dropout (global micro-batch indices: the same draws as one
process, :func:`pipec.reference_step`).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _workers import run_ranks
from models import MLP, TiedLM, TwoInput, gpt2
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.errors import ConfigError
from pipec.facade import Plan
from pipec.microbatch import replica_share
from pipec.runtime.runtime import PipelineRuntime

TOL = {"rtol": 1e-4, "atol": 1e-5}
SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1))


def _lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _gpt2(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"].flatten(0, 1), y.flatten())


def _count_loss(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy over the tokens that are not padding (-100): (sum, count)."""
    flat = y.flatten()
    return F.cross_entropy(out.flatten(0, 1), flat, ignore_index=-100, reduction="sum"), (flat != -100).sum()


def _case(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Any]:
    torch.manual_seed(0)
    batch = 8
    if name == "mlp":
        return MLP(), (torch.randn(batch, 16),), torch.randn(batch, 8), F.mse_loss
    if name == "two_input":
        return TwoInput(), (torch.randn(batch, 8), torch.randn(batch, 4)), torch.randn(batch, 2), F.mse_loss
    if name == "tied":
        return TiedLM(), (torch.randint(0, 64, (batch, 6)),), torch.randint(0, 64, (batch, 6)), _lm
    if name == "gpt2":
        return gpt2(), (torch.randint(0, 128, (batch, 16)),), torch.randint(0, 128, (batch, 16)), _gpt2
    raise KeyError(name)


def _plan(model: nn.Module, inputs: Any, target: Any, loss_fn: Any, *, schedule: str, spr: int,
          num_stages: int, data_parallel: int = 2, num_microbatches: int = 2,
          mesh_order: tuple[str, str] = ("dp", "pp")) -> Plan:
    plan = pipec.partition(model, inputs, num_stages=num_stages, num_microbatches=num_microbatches,
                           schedule=schedule, stages_per_rank=spr, loss_fn=loss_fn, target=target,
                           cost_model="cpu", data_parallel=data_parallel)
    assert plan.data.data_parallel == data_parallel and plan.data.batch_size == inputs[0].shape[0]
    if mesh_order != plan.data.mesh_order:  # the planner's choice (issue #15, planning side)
        plan = Plan(plan.data.model_copy(update={"mesh_order": mesh_order}), traced=plan.traced, loss_fn=loss_fn)
    return plan


def _reference(model: nn.Module, inputs: Any, target: Any, loss_fn: Any) -> tuple[dict[str, torch.Tensor], float]:
    ref = copy.deepcopy(model)
    out = loss_fn(ref(*inputs), target)
    loss = out[0] / out[1] if isinstance(out, tuple) else out
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False) if p.grad is not None}, loss.item()


def _steps(rank: int, world_size: int, cases: dict[str, tuple[Plan, Any, Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (plan, inputs, target, loss_fn) in cases.items():
        pipe = PipelineRuntime(plan, loss_fn, seed=0)
        d, size = pipe.data_parallel_rank, pipe.data_parallel_size
        loss = pipe.step(*replica_share(inputs, size, d), target=replica_share(target, size, d))
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        spans = [e for e in pipe.timeline() if e[3].endswith("DP_ALLREDUCE")]
        out[key] = (grads, None if loss is None else loss.item(), (pipe.pp_rank, d), spans)
        pipe.close()
    return out


def _check(per_rank: list[dict[str, Any]], key: str, want: dict[str, torch.Tensor], want_loss: float,
           world: int, model: nn.Module) -> None:
    seen: set[tuple[int, int]] = set()
    by_id: dict[int, list[str]] = {}
    for n, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(n)
    tied = {n for names in by_id.values() if len(names) > 1 for n in names}
    losses = []
    covered: set[str] = set()
    for rank, results in enumerate(per_rank):
        grads, loss, where, spans = results[key]
        seen.add(where)
        covered.update(grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, want[name], **TOL, msg=lambda m, n=name, r=rank: f"{key} rank {r} {n}: {m}")
        if world > 1 and set(grads) - tied:  # tied parameters are reduced over holders x replicas instead
            assert spans, f"{key}: rank {rank} recorded no DP_ALLREDUCE span"
        if loss is not None:
            losses.append(loss)
    assert len(seen) == world, f"{key}: ranks took the places {sorted(seen)}"
    assert {n for n, _ in model.named_parameters()} <= covered, f"{key}: no rank has {set(want) - covered}"
    assert losses and all(abs(x - want_loss) < 1e-4 for x in losses), (key, losses, want_loss)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["mlp", "two_input", "tied"])
def test_dp2_pp2_gradients_equal_full_batch(name: str) -> None:
    """DP2 x PP2: every schedule, gradients and loss as one process on the global batch."""
    model, inputs, target, loss_fn = _case(name)
    cases = {s: (_plan(model, inputs, target, loss_fn, schedule=s, spr=spr, num_stages=2 * spr), inputs, target,
                 loss_fn) for s, spr in SCHEDULES}
    per_rank = run_ranks(_steps, 4, cases, timeout=110)
    want, want_loss = _reference(model, inputs, target, loss_fn)
    for key in cases:
        _check(per_rank, key, want, want_loss, 4, model)


# The schedules added with #17: (name, stages_per_rank, micro-batches); dualpipe-v needs m >= num_stages.
NEW_SCHEDULES = (("zb-h2", 1, 2), ("interleaved-zb", 2, 2), ("zb-v", 2, 2), ("dualpipe-v", 2, 4), ("synth", 1, 2),
                 ("synth", 2, 2))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["mlp", "tied"])
def test_dp2_pp2_new_schedules_equal_full_batch(name: str) -> None:
    """DP2 x PP2 under the V, zero-bubble and synthesised schedules: gradients as one process."""
    model, inputs, target, loss_fn = _case(name)
    cases = {f"{s}/v{spr}": (_plan(model, inputs, target, loss_fn, schedule=s, spr=spr, num_stages=2 * spr,
                                   num_microbatches=m), inputs, target, loss_fn) for s, spr, m in NEW_SCHEDULES}
    per_rank = run_ranks(_steps, 4, cases, timeout=110)
    want, want_loss = _reference(model, inputs, target, loss_fn)
    for key in cases:
        _check(per_rank, key, want, want_loss, 4, model)


@pytest.mark.timeout(120)
def test_mesh_orders_gpt2_and_count_loss() -> None:
    """("pp", "dp") puts a stage's replicas on adjacent ranks; GPT-2; a (loss_sum, count)
    loss with padding spread unevenly over the replicas is divided by the GLOBAL count."""
    model, inputs, target, loss_fn = _case("gpt2")
    tied_model, tied_in, tied_target, _ = _case("tied")
    padded = tied_target.clone()
    padded[:3, 2:] = -100  # replica 0's share has more padding than replica 1's
    cases = {
        "gpt2/pp-dp": (_plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2,
                             mesh_order=("pp", "dp")), inputs, target, loss_fn),
        "tied/count/pp-dp": (_plan(tied_model, tied_in, padded, _count_loss, schedule="zb-h1", spr=1, num_stages=2,
                                   mesh_order=("pp", "dp")), tied_in, padded, _count_loss),
    }
    per_rank = run_ranks(_steps, 4, cases, timeout=110)
    want, want_loss = _reference(model, inputs, target, loss_fn)
    _check(per_rank, "gpt2/pp-dp", want, want_loss, 4, model)
    want, want_loss = _reference(tied_model, tied_in, padded, _count_loss)
    _check(per_rank, "tied/count/pp-dp", want, want_loss, 4, tied_model)


@pytest.mark.timeout(90)
def test_dp2_pp1_pure_data_parallel() -> None:
    """One stage, two replicas: plain data parallelism through the same runtime."""
    model, inputs, target, loss_fn = _case("tied")
    cases = {"dp2": (_plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=1),
                     inputs, target, loss_fn)}
    per_rank = run_ranks(_steps, 2, cases, timeout=80)
    want, want_loss = _reference(model, inputs, target, loss_fn)
    _check(per_rank, "dp2", want, want_loss, 2, model)


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, training=self.training))


def _dropout_step(rank: int, world_size: int, plan: Plan, inputs: Any, target: Any) -> dict[str, torch.Tensor]:
    pipe = PipelineRuntime(plan, F.mse_loss, seed=7)
    d, size = pipe.data_parallel_rank, pipe.data_parallel_size
    pipe.step(*replica_share(inputs, size, d), target=replica_share(target, size, d))
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
    pipe.close()
    return grads


@pytest.mark.timeout(90)
def test_dropout_draws_by_global_microbatch() -> None:
    """Replica d draws micro-batch m as global micro-batch d * M + m: the gradients equal
    pipec.reference_step's on the global batch with the same seed (one process)."""
    torch.manual_seed(0)
    model = _Dropout().train()
    inputs, target = (torch.randn(8, 8),), torch.randn(8, 2)
    plan = _plan(model, inputs, target, F.mse_loss, schedule="1f1b", spr=1, num_stages=2)
    want = pipec.reference_step(plan, *inputs, target=target, seed=7).grads
    got: dict[str, torch.Tensor] = {}
    for r, grads in enumerate(run_ranks(_dropout_step, 4, plan, inputs, target, timeout=80)):
        for n, g in grads.items():
            torch.testing.assert_close(g, want[n], **TOL, msg=lambda m, n=n, r=r: f"rank {r} {n}: {m}")
            got[n] = g
    assert set(got) == set(want)
    # and the draws differ per replica: replica 0's micro-batches alone give other gradients
    alone = pipec.reference_step(plan, *replica_share(inputs, 2, 0), target=replica_share(target, 2, 0), seed=7)
    assert not all(torch.allclose(alone.grads[n], want[n]) for n in want)


def test_bad_data_parallel_arguments() -> None:
    model, inputs, target, loss_fn = _case("mlp")
    with pytest.raises(ConfigError, match="data_parallel x num_microbatches = 2 x 3 = 6"):
        _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2, num_microbatches=3)
    with pytest.raises(ConfigError, match=r"global batch \(8 samples.*= 3 x 1 = 3 equal micro-batches"):
        _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2, data_parallel=3,
              num_microbatches=1)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="data_parallel: expected"):
            _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2, data_parallel=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data_parallel='auto' needs num_devices=N"):
        _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2, data_parallel="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data_parallel=3 does not divide num_devices=8"):
        pipec.partition(model, inputs, loss_fn=loss_fn, target=target, cost_model="cpu", data_parallel=3,
                        num_devices=8)
    with pytest.raises(ConfigError, match="device_speeds: not supported with data_parallel"):
        pipec.partition(model, inputs, num_stages=2, loss_fn=loss_fn, target=target, cost_model="cpu",
                        data_parallel=2, device_speeds=[1.0, 0.5])


def _world_mismatch(rank: int, world_size: int, plan: Plan) -> str:
    try:
        PipelineRuntime(plan, F.mse_loss)
        text = "no error"
    except ConfigError as exc:
        text = str(exc)
    torch.distributed.barrier()  # rank 0 hosts the store: it stays until every rank has joined
    return text


@pytest.mark.timeout(60)
def test_world_size_that_does_not_match_the_plan() -> None:
    """A DP2 x PP2 plan (4 processes) started on 2: a ConfigError on every rank, saying both."""
    model, inputs, target, loss_fn = _case("mlp")
    plan = _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2)
    for text in run_ranks(_world_mismatch, 2, plan, timeout=50):
        assert "2 replicas x 2 pipeline ranks = 4 processes" in text and "has 2" in text, text


def _train_and_save(rank: int, world_size: int, plan: Plan, inputs: Any, target: Any, directory: str) -> Any:
    pipe = PipelineRuntime(plan, F.mse_loss, seed=0)
    opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
    d, size = pipe.data_parallel_rank, pipe.data_parallel_size
    pipe.step(*replica_share(inputs, size, d), target=replica_share(target, size, d))
    opt.step()
    pipe.save_checkpoint(directory, optimizer=opt)
    state = {k: v.clone() for k, v in pipe.state_dict().items()}
    pipe.close()
    return state


def _load(rank: int, world_size: int, plan: Plan, directory: str) -> Any:
    pipe = PipelineRuntime(plan, F.mse_loss)
    opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
    step = pipe.load_checkpoint(directory, optimizer=opt if pipe.plan.num_ranks == 2 else None)
    state = {k: v.clone() for k, v in pipe.state_dict().items()}
    pipe.close()
    torch.distributed.barrier()  # loading is per rank: rank 0 (the store host) waits for the others
    return step, state


@pytest.mark.timeout(120)
def test_checkpoint_written_once_per_stage_resumed_into_another_data_parallel(tmp_path: Any) -> None:
    """DP2 x PP2 saves: one directory per pipeline rank (replica 0 writes); it loads into
    DP1 x PP2 (optimizer too: the same pipeline layout) and into DP2 x PP1 (a different
    split), every rank getting the trained weights."""
    model, inputs, target, loss_fn = _case("mlp")
    directory = str(tmp_path / "ckpt")
    saved = run_ranks(_train_and_save, 4, _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1,
                                                  num_stages=2), inputs, target, directory, timeout=100)
    step_dir = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["rank0", "rank1"]
    trained: dict[str, torch.Tensor] = {}
    for state in saved:
        for k, v in state.items():
            if k in trained:  # the replicas stepped to equal weights
                torch.testing.assert_close(v, trained[k])
            trained[k] = v
    for plan, world in ((_plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=2,
                               data_parallel=1), 2),
                        (_plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=1), 2)):
        for step, state in run_ranks(_load, world, plan, directory, timeout=60):
            assert step == 1
            for k, v in state.items():
                torch.testing.assert_close(v, trained[k])


def _zero_runs(rank: int, world_size: int, plan: str, inputs: Any, target: Any, directory: str) -> Any:
    def run(pipe: PipelineRuntime, opt: torch.optim.Optimizer) -> None:
        d, size = pipe.data_parallel_rank, pipe.data_parallel_size
        pipe.step(*replica_share(inputs, size, d), target=replica_share(target, size, d))
        opt.step()
        opt.zero_grad()

    plain = PipelineRuntime(plan, F.mse_loss)
    opt = plain.optimizer(torch.optim.Adam, lr=0.01, zero=False)
    run(plain, opt)
    run(plain, opt)
    want = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.close()
    sharded = PipelineRuntime(plan, F.mse_loss, zero=1)
    zopt = sharded.optimizer(torch.optim.Adam, lr=0.01)
    assert type(zopt).__name__ == "ZeroRedundancyOptimizer"
    run(sharded, zopt)
    sharded.save_checkpoint(directory, optimizer=zopt)
    sharded.close()
    resumed = PipelineRuntime(plan, F.mse_loss, zero=1)
    zopt = resumed.optimizer(torch.optim.Adam, lr=0.01)
    resumed.load_checkpoint(directory, optimizer=zopt)
    run(resumed, zopt)
    got = {k: v.clone() for k, v in resumed.state_dict().items()}
    resumed.close()
    torch.distributed.barrier()
    return want, got


@pytest.mark.timeout(120)
def test_zero1_matches_plain_optimizer_and_resumes(tmp_path: Any) -> None:
    """ZeRO-1 (Adam state sharded over the 2 replicas) takes the same steps as plain Adam,
    also across a checkpoint (shards gathered onto replica 0, which writes them)."""
    model, inputs, target, _ = _case("mlp")
    plan = _plan(model, inputs, target, F.mse_loss, schedule="1f1b", spr=1, num_stages=2)
    saved = str(plan.save(tmp_path / "plan"))  # each runtime starts from the saved weights
    for want, got in run_ranks(_zero_runs, 4, saved, inputs, target, str(tmp_path / "ckpt"), timeout=110):
        assert set(want) == set(got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], **TOL)


def _accumulate_and_clip(rank: int, world_size: int, plan: Plan, inputs: Any, target: Any, loss_fn: Any) -> Any:
    pipe = PipelineRuntime(plan, loss_fn)
    d, size = pipe.data_parallel_rank, pipe.data_parallel_size
    for _ in range(2):  # no zero_grad in between: the gradients add up, as on one process
        pipe.step(*replica_share(inputs, size, d), target=replica_share(target, size, d))
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
    norm = pipe.clip_grad_norm_(1e-3)
    pipe.close()
    return grads, norm.item()


@pytest.mark.timeout(90)
def test_accumulated_steps_and_global_norm_clipping() -> None:
    """Two steps without zero_grad give twice the full-batch gradient (earlier gradients,
    equal on every replica, are not summed again), and clip_grad_norm_ returns the whole
    model's norm on every rank of both replicas (the tied head counted once)."""
    model, inputs, target, loss_fn = _case("tied")
    plan = _plan(model, inputs, target, loss_fn, schedule="zb-h1", spr=1, num_stages=2)
    want, _ = _reference(model, inputs, target, loss_fn)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(2 * g) for n, g in want.items()
                                                 if n != "head.weight"])).item()
    for rank, (grads, got_norm) in enumerate(run_ranks(_accumulate_and_clip, 4, plan, inputs, target, loss_fn,
                                                                     timeout=80)):
        for n, g in grads.items():
            torch.testing.assert_close(g, 2 * want[n], **TOL, msg=lambda m, n=n, r=rank: f"rank {r} {n}: {m}")
        assert abs(got_norm - norm) < 1e-4 * norm, (rank, got_norm, norm)


def test_bad_runtime_options() -> None:
    """zero and bucket_bytes are checked before any process group is joined."""
    model, inputs, target, loss_fn = _case("mlp")
    plan = _plan(model, inputs, target, loss_fn, schedule="1f1b", spr=1, num_stages=1, data_parallel=1,
                 num_microbatches=2)
    for kwargs, text in (({"zero": 2}, "zero: expected 0"), ({"bucket_bytes": 0}, "bucket_bytes: expected")):
        with pytest.raises(ConfigError, match=text):
            PipelineRuntime(plan, loss_fn, **kwargs)
    pipe = PipelineRuntime(plan, loss_fn, zero=1)  # one replica: zero is the plain optimizer
    assert pipe.data_parallel_size == 1 and pipe.data_parallel_rank == 0
    assert type(pipe.optimizer(torch.optim.SGD, lr=0.1)) is torch.optim.SGD
    pipe.close()


def _optimizer_kind(rank: int, world_size: int, plan: Plan) -> tuple[str, str]:
    pipe = PipelineRuntime(plan, F.mse_loss)
    kinds = (type(pipe.optimizer(torch.optim.Adam, lr=1e-3)).__name__,
             type(pipe.optimizer(torch.optim.Adam, lr=1e-3, zero=False)).__name__)
    pipe.close()
    return kinds


@pytest.mark.timeout(90)
def test_a_zero1_plan_counts_a_share_of_the_optimizer_state_and_runs_sharded() -> None:
    """partition(zero=1): each rank's predicted memory holds 1/D of Adam's state (8 bytes per
    parameter -> 4 with D = 2), the plan says so, and its runtime shards by default."""
    model, inputs, target, loss_fn = _case("mlp")
    kwargs: dict[str, Any] = dict(num_stages=2, num_microbatches=2, loss_fn=loss_fn, target=target, cost_model="cpu",
                                  data_parallel=2)
    plain, sharded = (pipec.partition(model, inputs, zero=z, **kwargs) for z in (0, 1))
    assert (plain.data.zero, sharded.data.zero) == (0, 1)
    assert sharded.data.optimizer_state_bytes_per_param == plain.data.optimizer_state_bytes_per_param == 8
    same = [(a, b) for a, b in zip(plain.stages, sharded.stages) if a.nodes == b.nodes]
    assert same  # the same stage: only the optimizer state's share differs
    for a, b in same:
        assert a.memory_bytes - b.memory_bytes == 4 * a.num_params
    assert run_ranks(_optimizer_kind, 4, sharded, timeout=80) == [("ZeroRedundancyOptimizer", "Adam")] * 4
    assert run_ranks(_optimizer_kind, 4, plain, timeout=80) == [("Adam", "Adam")] * 4
    with pytest.raises(ConfigError, match="zero=1 shards the optimizer state over data-parallel replicas"):
        pipec.partition(model, inputs, num_stages=2, loss_fn=loss_fn, target=target, cost_model="cpu", zero=1)
    with pytest.raises(ConfigError, match="zero: expected 0"):
        pipec.partition(model, inputs, zero=2, **kwargs)
