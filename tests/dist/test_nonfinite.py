"""Bad numbers: a NaN in one micro-batch is found, located and handled the same on every rank.

The model takes ``sqrt(x[:, :1] + 1)``: finite for the data of every
micro-batch but one, whose rows have ``x[:, 0] = -5``. With
``nonfinite="raise"`` every rank raises ``NonfiniteError`` with the same
message, naming the stage holding the sqrt, that micro-batch and the node
(``sqrt``). With ``"skip"`` no rank's parameters change in that step, the step
is counted, and the next finite step updates as usual. On DP2 x PP2 the bad
rows are replica 1's: replica 0's ranks skip too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.microbatch import replica_share


class Fragile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        s = torch.sqrt(x[:, :1] + 1.0)
        return self.c(h * s)


def _plan(data_parallel: int) -> Plan:
    torch.manual_seed(0)
    x, y = torch.rand(8, 8), torch.randn(8, 4)
    return pipec.partition(Fragile(), (x,), num_stages=2, num_microbatches=4 // data_parallel, schedule="1f1b",
                           loss_fn=F.mse_loss, target=y, cost_model="cpu", data_parallel=data_parallel,
                           strategy="by-params")


def _batch(bad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(8, 8, generator=g), torch.randn(8, 4, generator=g)
    if bad:
        x[4:6, 0] = -5.0  # rows of micro-batch 2 (replica 1's micro-batch 0 with two replicas)
    return x, y


def _run(rank: int, world_size: int, plan: Plan | str, policy: str) -> dict[str, Any]:
    from pipec.errors import NonfiniteError
    from pipec.runtime.runtime import PipelineRuntime

    pipe = PipelineRuntime(plan, F.mse_loss, seed=0, nonfinite=policy)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
    changed: list[bool] = []
    for bad in (False, True, False):
        x, y = _batch(bad)
        if pipe.data_parallel_size > 1:
            x, y = replica_share((x, y), pipe.data_parallel_size, pipe.data_parallel_rank)
        before = [p.detach().clone() for p in pipe.parameters()]
        try:
            pipe.step(x, target=y)
        except NonfiniteError as e:
            return {"error": str(e), "step": e.step}
        optimizer.step()
        optimizer.zero_grad()
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, pipe.parameters())))
    pipe.close()
    return {"changed": changed, "skipped": pipe.skipped_steps,
            "finite": all(bool(torch.isfinite(p).all()) for p in pipe.parameters())}


def _sqrt_stage(plan: Plan) -> int:
    return next(s.index for s in plan.stages if any("sqrt" in n for n in s.nodes))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data_parallel", [1, 2], ids=["pp2", "dp2pp2"])
def test_raise_names_the_stage_microbatch_and_node_on_every_rank(data_parallel: int) -> None:
    plan = _plan(data_parallel)
    results = run_ranks(_run, plan.data.world_size, plan, "raise")
    messages = {r["error"] for r in results}
    assert len(messages) == 1, messages  # the same text on every rank
    message = messages.pop()
    microbatch = 2 if data_parallel == 1 else 0
    assert f"the forward of stage {_sqrt_stage(plan)}, micro-batch {microbatch}, node sqrt" in message, message
    assert message.startswith("step 1 has a non-finite loss or gradient"), message
    if data_parallel == 2:
        assert "replica 1" in message, message
    assert {r["step"] for r in results} == {1}


@pytest.mark.timeout(120)
def test_a_loaded_plan_names_the_line_of_its_stage_file(tmp_path: Any) -> None:
    plan = _plan(1)
    stage = _sqrt_stage(plan)
    directory = plan.save(tmp_path / "plan")
    results = run_ranks(_run, 2, str(directory), "raise")
    message = results[0]["error"]
    line = next(i for i, text in enumerate((directory / f"stage_{stage}.py").read_text().splitlines(), 1)
                if text.strip().startswith("sqrt = "))
    assert f"node sqrt (sqrt, stage_{stage}.py line {line})" in message, message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data_parallel", [1, 2], ids=["pp2", "dp2pp2"])
def test_skip_updates_no_rank_and_counts_the_step(data_parallel: int) -> None:
    plan = _plan(data_parallel)
    results = run_ranks(_run, plan.data.world_size, plan, "skip")
    for r in results:
        assert r["changed"] == [True, False, True], results
        assert r["skipped"] == 1 and r["finite"], results


@pytest.mark.timeout(60)
def test_a_policy_other_than_raise_skip_off_is_refused() -> None:
    from pipec.errors import ConfigError
    from pipec.runtime.nonfinite import check_policy

    with pytest.raises(ConfigError, match="nonfinite: expected 'raise'"):
        check_policy("ignore")


class CausalMask(nn.Module):
    """Attention blocks sharing one float("-inf") causal mask built in the first stage: the
    mask crosses stages, and an infinity there is meant (not a bad number)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(4))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.full((x.size(1), x.size(1)), float("-inf")).triu(1)
        for qkv in self.qkv:
            q, k, v = qkv(x).chunk(3, dim=-1)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head(x).mean(1)


def _mask_worker(rank: int, world: int, plan: Plan, x: torch.Tensor, y: torch.Tensor) -> Any:
    pipe = pipec.PipelineRuntime(plan, F.mse_loss)  # nonfinite="raise", the default
    loss = pipe.step(x, target=y)
    return loss, {k: p.grad.clone() for k, p in pipe.named_parameters()}


@pytest.mark.timeout(120)
def test_an_infinite_attention_mask_across_stages_is_not_a_bad_number() -> None:
    torch.manual_seed(0)
    model = CausalMask()
    x, y = torch.randn(8, 6, 16), torch.randn(8, 4)
    plan = pipec.partition(model, (x,), num_stages=2, num_microbatches=2, loss_fn=F.mse_loss, target=y)
    assert any(b.name == "triu" for b in plan.data.boundaries)  # the mask crosses the cut
    results = run_ranks(_mask_worker, 2, plan, x, y)
    F.mse_loss(model(x), y).backward()
    assert torch.allclose(results[1][0], F.mse_loss(model(x), y).detach())
    grads = {**results[0][1], **results[1][1]}
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
