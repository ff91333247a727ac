"""Transparency on the model zoo: pipelined training equals single-process training.

For an MLP, a residual CNN, a tied-embedding LM, a two-input model and GPT-2
(from config), on 2 and 4 Gloo ranks, under every schedule (interleaved 1F1B
with two stages per rank): the loss of each step, every parameter's gradient
after the first step and every parameter after 3 SGD steps equal those of the
same model trained in one process; inference on the trained pipeline equals
the trained model. One process-group launch per world size runs every case.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import run_ranks
from _zoo_plans import MODELS, ZooModel, reference_training, zoo_model, zoo_plan
from torch.utils import _pytree as pytree

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
NUM_MICROBATCHES = 4
MICROBATCH = 2
STEPS = 3
LR = 0.05
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def zoo() -> dict[str, ZooModel]:
    return {name: zoo_model(name, microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=STEPS)
            for name in MODELS}


def _train(rank: int, world_size: int, cases: dict[str, tuple[Any, ZooModel]]) -> dict[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    results: dict[str, Any] = {}
    for key, (plan, zm) in cases.items():
        # an in-memory plan brings its loss_fn; a saved one (a directory) is given one
        pipe = PipelineRuntime(plan) if not isinstance(plan, str) else PipelineRuntime(plan, zm.loss_fn)
        opt = torch.optim.SGD(pipe.parameters(), lr=LR)
        losses, grads = [], None
        for inputs, target in zm.batches:
            opt.zero_grad()
            losses.append(pipe.step(*inputs, target=target))
            if grads is None:
                grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
            opt.step()
        output = pipe.forward(*zm.batches[0][0])
        results[key] = {
            "losses": losses,
            "grads": grads,
            "params": {n: p.detach().clone() for n, p in pipe.named_parameters()},
            "output": output,
        }
    return results


def _check(zoo: dict[str, ZooModel], num_ranks: int, saved: Path) -> None:
    cases: dict[str, tuple[Any, ZooModel]] = {
        f"{name}/{schedule}": (zoo_plan(zoo[name], num_ranks=num_ranks, schedule=schedule,
                                        num_microbatches=NUM_MICROBATCHES), zoo[name])
        for name in MODELS
        for schedule in SCHEDULES
    }
    # the same plans through plan.save / pipec.load (generated stage code, safetensors)
    for key in ("gpt2/zb-h1", "tied/interleaved-1f1b"):
        plan, zm = cases[key]
        cases[key + "/saved"] = (str(plan.save(saved / key.replace("/", "-"))), zm)
    per_rank = run_ranks(_train, num_ranks, cases, timeout=240)
    refs = {name: reference_training(zm, lr=LR) for name, zm in zoo.items()}
    for key in cases:
        name = key.split("/")[0]
        ref, zm = refs[name], zoo[name]
        holders = [r[key] for r in per_rank if r[key]["losses"][0] is not None]
        assert len(holders) == 1, f"{key}: the loss must come back on exactly one rank"
        last = holders[0]
        for step, (got, want) in enumerate(zip(last["losses"], ref["losses"])):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, k=key, s=step: f"{k} loss of step {s}: {m}")
        grads: dict[str, torch.Tensor] = {}
        params: dict[str, torch.Tensor] = {}
        for r in per_rank:
            for n, g in r[key]["grads"].items():
                if n in grads:  # a tied weight: every rank holding it sees the summed gradient
                    torch.testing.assert_close(g, grads[n], **TOL)
                grads[n] = g
            for n, p in r[key]["params"].items():
                if n in params:
                    torch.testing.assert_close(p, params[n], **TOL)
                params[n] = p
        assert set(grads) == set(ref["grads"]), f"{key}: gradients of {set(ref['grads']) ^ set(grads)}"
        for n, want in ref["grads"].items():
            torch.testing.assert_close(grads[n], want, **TOL, msg=lambda m, k=key, n=n: f"{k} grad {n}: {m}")
        assert set(params) == set(ref["params"]), key
        for n, want in ref["params"].items():
            torch.testing.assert_close(params[n], want, **TOL, msg=lambda m, k=key, n=n: f"{k} {n} after SGD: {m}")
        model = copy.deepcopy(zm.model)
        model.load_state_dict(ref["params"], strict=False)
        with torch.no_grad():
            want_out = model(*zm.batches[0][0])
        got_leaves = pytree.tree_leaves(last["output"])
        want_leaves = [t for t in pytree.tree_leaves(want_out) if isinstance(t, torch.Tensor)]
        assert len(got_leaves) == len(want_leaves), key
        for got, want in zip(got_leaves, want_leaves):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, k=key: f"{k} forward: {m}")
        for r in per_rank:
            if r[key] is not last:
                assert r[key]["output"] is None


@pytest.mark.timeout(300)
def test_zoo_two_ranks_every_schedule(zoo: dict[str, ZooModel], tmp_path: Path) -> None:
    _check(zoo, 2, tmp_path)


@pytest.mark.timeout(300)
def test_zoo_four_ranks_every_schedule(zoo: dict[str, ZooModel], tmp_path: Path) -> None:
    _check(zoo, 4, tmp_path)
