"""Resume anywhere: Adam and LR-scheduler state saved on one layout, loaded into another.

An MLP trains with Adam and a StepLR scheduler for 6 steps (a batch drawn from
the step index, so every run sees the same data); layout A saves a checkpoint
(parameters, optimizer, scheduler) after 3 steps and carries on. Layout B loads
it -- another number of stages, and another number of replicas -- and trains
the last 3 steps (built with another seed: it takes the checkpoint's). Every parameter's Adam state in B right after loading equals
A's at the checkpoint exactly (found by FQN in whichever rank saved it), the
learning rate is A's, and B ends where A ended (up to the float rounding of
another reduction order). Cases: PP2 -> PP3, and DP2 x PP2 -> DP1 x PP4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import run_ranks
from models import MLP
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.microbatch import replica_share

STEPS, SAVED, BATCH = 6, 3, 8
TOL = {"rtol": 1e-4, "atol": 1e-6}

torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # import torch._dynamo once, before forking


def _plan(num_stages: int, data_parallel: int) -> Plan:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(BATCH, 16), torch.randn(BATCH, 8)
    return pipec.partition(model, (x,), num_stages=num_stages, num_microbatches=2, schedule="1f1b",
                           loss_fn=F.mse_loss, target=y, cost_model="cpu", data_parallel=data_parallel,
                           strategy="by-params")  # every stage holds parameters


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 8, generator=g)


def _adam_state(pipe: Any, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in pipe.named_parameters()
            if p in optimizer.state}


def _train(rank: int, world_size: int, plan: Plan, directory: str, mode: str) -> dict[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    pipe = PipelineRuntime(plan, F.mse_loss, seed=0 if mode == "save" else 99)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    state: dict[str, Any] = {}
    first = 0
    if mode == "resume":
        first = pipe.load_checkpoint(directory, optimizer=optimizer, scheduler=scheduler)
        state = {"adam": _adam_state(pipe, optimizer), "lr": [g["lr"] for g in optimizer.param_groups],
                 "seed": pipe.seed}
    for step in range(first, STEPS):
        if mode == "save" and step == SAVED:
            pipe.save_checkpoint(directory, optimizer=optimizer, scheduler=scheduler, step=SAVED)
            state = {"adam": _adam_state(pipe, optimizer), "lr": [g["lr"] for g in optimizer.param_groups]}
        x, y = _batch(step)
        if pipe.data_parallel_size > 1:
            (x, y) = replica_share((x, y), pipe.data_parallel_size, pipe.data_parallel_rank)
        pipe.step(x, target=y)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    pipe.close()
    return {"first": first, "params": {n: p.detach().clone() for n, p in pipe.named_parameters()}, **state}


def _merged(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return {n: v for r in results for n, v in r[key].items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("saved", "loaded"), [((2, 1), (3, 1)), ((2, 2), (4, 1))], ids=["pp2-pp3", "dp2pp2-dp1pp4"])
def test_adam_and_scheduler_state_load_into_another_layout(
    tmp_path: Path, saved: tuple[int, int], loaded: tuple[int, int]
) -> None:
    directory = str(tmp_path / "ckpt")
    a, b = _plan(*saved), _plan(*loaded)
    assert (a.num_stages, a.data.data_parallel, b.num_stages, b.data.data_parallel) == (*saved, *loaded)
    straight = run_ranks(_train, a.data.world_size, a, directory, "save")
    resumed = run_ranks(_train, b.data.world_size, b, directory, "resume")
    assert [r["first"] for r in resumed] == [SAVED] * len(resumed)
    assert {r["seed"] for r in resumed} == {0}  # the checkpoint's seed, not the 99 the runtime was built with

    before, after = _merged(straight, "adam"), _merged(resumed, "adam")
    assert set(after) == set(before) and len(before) == 10  # 5 Linear layers: weight and bias
    for name, entries in before.items():
        assert set(after[name]) == set(entries) == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, value in entries.items():
            assert torch.equal(after[name][key], value), (name, key)
    assert {lr for r in resumed for lr in r["lr"]} == {lr for r in straight for lr in r["lr"]} == {0.005}

    expected, found = _merged(straight, "params"), _merged(resumed, "params")
    assert set(found) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, **TOL)
