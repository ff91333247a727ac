"""The runtime in one process: one-rank plans need no process group.

Two stages interleaved on one rank exercise the local hand-off of boundary
tensors and gradients, parameter sharing of a tied weight, and the errors a
user meets at the API boundary.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _handmade import Chain, chain_plan

from pipec.errors import ConfigError, PipecError, RuntimeFailure
from pipec.runtime.runtime import PipelineRuntime
from pipec.schedule.generators import make_schedule
from pipec.schedule.ir import Schedule


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("name", ["interleaved-1f1b", "zb-h1-local"])
def test_one_rank_two_stages_matches_single_process(name: str) -> None:
    torch.manual_seed(0)
    model = Chain(4, skip=True, tied=True)
    if name == "interleaved-1f1b":
        sched = make_schedule("interleaved-1f1b", 2, 2, 2)
    else:  # I/W split by hand on one rank: both stages' I before any W
        sched = Schedule.from_text("0: 0F0 1F0 0F1 1F1 1I0 0I0 1I1 0I1 1W0 0W0 1W1 0W1", name="zb-local")
    plan = chain_plan(model, sched, batch=4, bounds=[0, 2, 4], tied=True)
    pipe = PipelineRuntime(plan)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    loss = pipe.step(x, target=y)
    ref = copy.deepcopy(model)
    ref_loss = _mse(ref(x), y)
    ref_loss.backward()
    assert loss is not None
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-6)
    got = dict(pipe.named_parameters())
    assert set(got) == {n for n, _ in ref.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6)
    # the tied weight is one tensor on this rank, listed once
    assert len(list(pipe.parameters())) == len(got)
    torch.testing.assert_close(pipe.forward(x), ref(x), rtol=1e-4, atol=1e-6)


def test_gradients_accumulate_across_steps() -> None:
    torch.manual_seed(1)
    model = Chain(3, tied=True)
    plan = chain_plan(model, make_schedule("interleaved-1f1b", 2, 2, 2), batch=4, bounds=[0, 1, 3], tied=True)
    pipe = PipelineRuntime(plan)
    ref = copy.deepcopy(model)
    for _ in range(2):  # no zero_grad in between
        x, y = torch.randn(4, 8), torch.randn(4, 8)
        pipe.step(x, target=y)
        _mse(ref(x), y).backward()
    got = dict(pipe.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(2)
    model = Chain(3, tied=True)
    plan = chain_plan(model, make_schedule("interleaved-1f1b", 2, 2, 2), batch=4, bounds=[0, 1, 3], tied=True)
    pipe = PipelineRuntime(plan)
    sd = pipe.state_dict()
    assert set(sd) == set(model.state_dict()) - {"head.weight"}  # the tied alias once, canonical FQN
    other = Chain(3, tied=True)
    result = pipe.load_state_dict(other.state_dict(), strict=False)
    assert result.missing_keys == []
    x = torch.randn(4, 8)
    torch.testing.assert_close(pipe.forward(x), other(x).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="missing keys"):
        pipe.load_state_dict({"blocks.0.weight": sd["blocks.0.weight"]})


def _plan() -> tuple[Chain, PipelineRuntime]:
    torch.manual_seed(3)
    model = Chain(2)
    return model, PipelineRuntime(chain_plan(model, make_schedule("interleaved-1f1b", 2, 2, 2), batch=4, bounds=[0, 1, 2]))


def test_wrong_batch_shape_says_what_to_pass() -> None:
    _, pipe = _plan()
    with pytest.raises(ConfigError, match=r"a batch of 5 along dim 0 does not split into 2 equal micro-batches.*"
                                          r"e\.g\. 4 or 6; the plan was made for 4"):
        pipe.step(torch.randn(5, 8), target=torch.randn(5, 8))
    with pytest.raises(ConfigError, match=r"expected a batch of 2 dimensions like \(4, 8\).*found shape \(4, 8, 1\)"):
        pipe.step(torch.randn(4, 8, 1), target=torch.randn(4, 8, 1))
    with pytest.raises(ConfigError, match="dtype"):
        pipe.forward(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="missing input 'x'"):
        pipe.forward()


def test_missing_loss_function_is_a_config_error() -> None:
    _, pipe = _plan()
    pipe.loss_fn = None
    with pytest.raises(ConfigError, match="loss_fn"):
        pipe.step(torch.randn(4, 8))


def test_broken_schedule_names_rank_action_and_step() -> None:
    torch.manual_seed(4)
    sched = Schedule.from_text("0: 0F0 1F0 0B0 1B0", name="broken", stages_per_rank=2)
    pipe = PipelineRuntime(chain_plan(Chain(2), sched, batch=2, bounds=[0, 1, 2]))
    with pytest.raises(RuntimeFailure) as info:
        pipe.step(torch.randn(2, 8), target=torch.randn(2, 8))
    err = info.value
    assert (err.rank, err.action, err.step) == (0, "0B0", 0)
    assert "1B0" in str(err)  # says what the schedule lacks


def test_multi_rank_plan_outside_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PIPEC_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    plan = chain_plan(Chain(2), make_schedule("1f1b", 2, 2), batch=4, bounds=[0, 1, 2])
    with pytest.raises(PipecError, match=r"process group of 2 ranks.*pipec run"):
        PipelineRuntime(plan)
