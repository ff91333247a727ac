"""Losses normalised by a count: ``loss_fn`` returning ``(loss_sum, count)``.

A token-mean loss with padding (``ignore_index=-100``) spread unevenly over the
micro-batches: on 2 Gloo ranks, under GPipe, 1F1B, ZB-H1 and interleaved 1F1B,
the step's loss and every gradient equal the full batch's token mean on one
process (not the mean of per-micro-batch means, which differs here), also when
gradients accumulate over two steps without ``zero_grad`` -- ZB-H1 also from a
saved plan directory (``plan.save`` -> ``pipec.load``). A ``loss_fn``
returning anything else fails on every rank with a message naming what it got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import run_ranks
from _zoo_plans import zoo_model, zoo_plan
from torch.nn import functional as F

import pipec

SCHEDULES = ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b")
NUM_MICROBATCHES = 4
MICROBATCH = 2
TOL = {"rtol": 1e-4, "atol": 1e-6}


def token_sum(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"), (y != -100).sum()


def token_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)


def three_values(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    total, count = token_sum(out, y)
    return total, count, 0


def _padded(target: torch.Tensor, step: int) -> torch.Tensor:
    """Pad the target unevenly: micro-batch 0 keeps every token, 1 one token, 2 none
    in step 0 (half in step 1), 3 half of them."""
    y = target.clone()
    per = MICROBATCH
    y[per:2 * per] = -100
    y[per, 0] = target[per, 0]
    if step == 0:
        y[2 * per:3 * per] = -100
    else:
        y[2 * per:3 * per, ::2] = -100
    y[3 * per:, 3:] = -100
    return y


def _train(rank: int, world_size: int, plans: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    from pipec.errors import PipecError
    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    for key, plan in plans.items():
        pipe = PipelineRuntime(plan, token_sum)
        losses = []
        for inputs, target in batches:  # no zero_grad: the second step's gradients add to the first's
            losses.append(pipe.step(*inputs, target=target))
        out[key] = {"losses": losses, "grads": {n: p.grad.clone() for n, p in pipe.named_parameters()
                                                if p.grad is not None}}
    # a loss_fn that returns three values fails on every rank, naming what it returned
    pipe = PipelineRuntime(plans["1f1b"], three_values)
    try:
        pipe.step(*batches[0][0], target=batches[0][1])
        out["bad"] = None
    except PipecError as e:
        out["bad"] = (type(e).__name__, str(e))
    return out


@pytest.mark.timeout(300)
def test_token_mean_over_uneven_padding_equals_full_batch(tmp_path: Path) -> None:
    zm = zoo_model("tied", microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=2)
    batches = [(inputs, _padded(target, step)) for step, (inputs, target) in enumerate(zm.batches)]
    plans: dict[str, Any] = {s: zoo_plan(zm, num_ranks=2, schedule=s, num_microbatches=NUM_MICROBATCHES)
                             for s in SCHEDULES}
    plans["zb-h1/saved"] = str(plans["zb-h1"].save(tmp_path / "zb-h1"))  # each rank loads the directory
    per_rank = run_ranks(_train, 2, plans, batches, timeout=280)

    model = zm.model
    model.zero_grad()
    ref_losses = []
    for inputs, target in batches:
        loss = token_mean(model(*inputs), target)
        loss.backward()
        ref_losses.append(loss.detach())
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    # the mean of per-micro-batch token means is a different number (micro-batch 2 has no token
    # in step 0): the test would catch a runtime that averaged per micro-batch
    with torch.no_grad():
        out = model(*batches[1][0])
    per_mb = [token_mean(o, t) for o, t in zip(out.chunk(NUM_MICROBATCHES), batches[1][1].chunk(NUM_MICROBATCHES))]
    assert not torch.allclose(torch.stack(per_mb).mean(), ref_losses[1], rtol=1e-3)

    for key in [*SCHEDULES, "zb-h1/saved"]:
        holders = [r[key] for r in per_rank if r[key]["losses"][0] is not None]
        assert len(holders) == 1, key
        for step, (got, want) in enumerate(zip(holders[0]["losses"], ref_losses)):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, k=key, s=step: f"{k} loss of step {s}: {m}")
        grads: dict[str, torch.Tensor] = {}
        for r in per_rank:
            grads.update(r[key]["grads"])
        assert set(grads) == set(ref_grads), key
        for n, want in ref_grads.items():
            torch.testing.assert_close(grads[n], want, **TOL, msg=lambda m, k=key, n=n: f"{k} grad {n}: {m}")

    kinds = [r["bad"] for r in per_rank]
    assert all(k is not None for k in kinds), kinds
    last = next(message for _, message in kinds if "loss_fn must return" in message)
    assert "a tuple of 3" in last and "(loss_sum, count)" in last


@pytest.mark.timeout(120)
def test_one_rank_interleaved_and_a_loss_that_changes_kind(tmp_path: Path) -> None:
    """Without a process group (one rank, two stages) the count needs no broadcast; a
    loss_fn that returns a scalar after (loss_sum, count) is refused, as is a mix in a step."""
    from pipec.errors import ConfigError, RuntimeFailure
    from pipec.runtime.runtime import PipelineRuntime

    zm = zoo_model("tied", microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=1)
    (inputs, target), = zm.batches
    target = _padded(target, 0)
    plan = zoo_plan(zm, num_ranks=1, schedule="interleaved-1f1b", num_microbatches=NUM_MICROBATCHES)
    pipe = PipelineRuntime(plan, token_sum)
    loss = pipe.step(*inputs, target=target)
    model = zm.model
    model.zero_grad()
    want = token_mean(model(*inputs), target)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), **TOL)
    for n, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, dict(model.named_parameters())[n].grad, **TOL)
    # the same plan through plan.save -> pipec.load
    loaded = PipelineRuntime(pipec.load(plan.save(tmp_path / "plan")), token_sum)
    torch.testing.assert_close(loaded.step(*inputs, target=target), want.detach(), **TOL)
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p.grad, dict(model.named_parameters())[n].grad, **TOL)

    pipe.loss_fn = token_mean
    with pytest.raises(ConfigError, match=r"step 1: loss_fn returned a scalar loss, but \(loss_sum, count\) at the first"):
        pipe.step(*inputs, target=target)

    calls = {"n": 0}

    def mixed(out: torch.Tensor, y: torch.Tensor) -> Any:
        calls["n"] += 1
        return token_sum(out, y) if calls["n"] % 2 else token_mean(out, y)

    with pytest.raises(RuntimeFailure, match=r"loss_fn returned a scalar here but a \(loss_sum, count\) tuple for the step.s earlier"):
        PipelineRuntime(plan, mixed).step(*inputs, target=target)
