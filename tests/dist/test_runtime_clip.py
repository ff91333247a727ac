"""Gradient clipping by the whole pipeline's norm, and ``pipe.optimizer``.

On 2 Gloo ranks, for an MLP and a tied-embedding LM (the embedding and output
head on different ranks; also interleaved, two stages per rank), step by step:
``pipe.clip_grad_norm_`` returns the norm ``torch.nn.utils.clip_grad_norm_``
returns on the single-process model (2-norm, inf-norm; clipping active, and
not), the clipped gradients equal the reference's, and an SGD step through
``pipe.optimizer`` gives the reference's parameters. Clipping each rank by its
own norm would not: checked on the same gradients, so the test can fail. A bad
``norm_type`` raises on every rank before the collective; a non-finite total is
returned and applied as torch does.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from _workers import run_ranks
from _zoo_plans import ZooModel, zoo_model, zoo_plan

NUM_MICROBATCHES = 4
MICROBATCH = 2
LR = 0.1
TOL = {"rtol": 1e-4, "atol": 1e-6}
# (fraction of the step's unclipped norm to clip to, norm_type): clipping on, on (inf), off
CONFIGS = ((0.3, 2.0), (0.5, math.inf), (2.0, 2.0))


def _reference(zm: ZooModel) -> dict[str, Any]:
    """Single-process steps on the first batch: max_norm per step, returned norms,
    clipped gradients, parameters after each SGD step."""
    model = copy.deepcopy(zm.model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, target = zm.batches[0]
    out: dict[str, Any] = {"max_norms": [], "norms": [], "grads": [], "params": []}
    for fraction, norm_type in CONFIGS:
        opt.zero_grad()
        zm.loss_fn(model(*inputs), target).backward()
        unclipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
        max_norm = fraction * float(unclipped)
        out["max_norms"].append(max_norm)
        out["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type))
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        out["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _clip_worker(rank: int, world_size: int, cases: dict[str, tuple[Any, ZooModel, list[float]]]) -> dict[str, Any]:
    from pipec.errors import ConfigError
    from pipec.runtime.runtime import PipelineRuntime

    results: dict[str, Any] = {}
    for key, (plan, zm, max_norms) in cases.items():
        pipe = PipelineRuntime(plan)
        opt = pipe.optimizer(torch.optim.SGD, lr=LR)
        inputs, target = zm.batches[0]
        res: dict[str, Any] = {"norms": [], "local": [], "before": [], "grads": [], "params": [],
                               "num_params": len(opt.param_groups[0]["params"]),
                               "ids": len({id(p) for p in opt.param_groups[0]["params"]})}
        for (_, norm_type), max_norm in zip(CONFIGS, max_norms):
            opt.zero_grad()
            pipe.step(*inputs, target=target)
            named = dict(pipe.named_parameters())
            res["before"].append({n: p.grad.clone() for n, p in named.items()})
            res["local"].append(torch.nn.utils.get_total_norm([p.grad for p in named.values()], norm_type))
            res["norms"].append(pipe.clip_grad_norm_(max_norm, norm_type=norm_type))
            res["grads"].append({n: p.grad.clone() for n, p in named.items()})
            opt.step()
            res["params"].append({n: p.detach().clone() for n, p in named.items()})
        try:
            pipe.clip_grad_norm_(1.0, norm_type=0.0)
        except ConfigError as exc:
            res["bad_norm_type"] = str(exc)
        # a non-finite gradient on rank 0 only: every rank gets the inf total and scales by 0
        opt.zero_grad()
        pipe.step(*inputs, target=target)
        if rank == 0:
            next(pipe.parameters()).grad.view(-1)[0] = math.inf
        res["inf_total"] = pipe.clip_grad_norm_(1.0)
        res["inf_grads"] = {n: p.grad.clone() for n, p in pipe.named_parameters()}
        pipe.close()
        results[key] = res
    return results


@pytest.mark.timeout(300)
def test_clip_grad_norm_is_the_whole_models_on_two_gloo_ranks() -> None:
    torch.manual_seed(0)  # the models' initial weights
    zoo = {name: zoo_model(name, microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=1)
           for name in ("mlp", "tied")}
    refs = {name: _reference(zm) for name, zm in zoo.items()}
    layouts = {"mlp/1f1b": ("mlp", "1f1b"), "tied/1f1b": ("tied", "1f1b"),
               "tied/interleaved-1f1b": ("tied", "interleaved-1f1b")}
    cases = {key: (zoo_plan(zoo[name], num_ranks=2, schedule=schedule, num_microbatches=NUM_MICROBATCHES),
                   zoo[name], refs[name]["max_norms"])
             for key, (name, schedule) in layouts.items()}
    per_rank = run_ranks(_clip_worker, 2, cases, timeout=240)
    for key, (name, _) in layouts.items():
        ref = refs[name]
        ranks = [r[key] for r in per_rank]
        if name == "tied":  # the embedding and the head: one tensor, held by both ranks
            assert "embed.weight" in ranks[0]["grads"][0] and "embed.weight" in ranks[1]["grads"][0], key
        for res in ranks:
            assert res["num_params"] == res["ids"] == len(res["grads"][0]), f"{key}: a parameter passed twice"
            assert "norm_type" in res["bad_norm_type"], key
        for i, (fraction, norm_type) in enumerate(CONFIGS):
            where = f"{key} step {i} (norm_type={norm_type}, max_norm={fraction} x norm)"
            for r, res in enumerate(ranks):
                torch.testing.assert_close(res["norms"][i], ref["norms"][i], **TOL, msg=f"{where} rank {r}")
                for n, g in res["grads"][i].items():
                    torch.testing.assert_close(g, ref["grads"][i][n], **TOL, msg=f"{where} rank {r} grad {n}")
                for n, p in res["params"][i].items():
                    torch.testing.assert_close(p, ref["params"][i][n], **TOL, msg=f"{where} rank {r} param {n}")
            covered = set().union(*(res["grads"][i] for res in ranks))
            assert covered == set(ref["grads"][i]) - {"head.weight"}, where
            if fraction >= 1.0:
                continue
            # clipping each rank by its own norm (the common bug) gives other gradients
            total = float(ref["norms"][i])
            differs = []
            for r, res in enumerate(ranks):
                local = float(res["local"][i])
                if norm_type == 2.0:
                    assert local < total, f"{where} rank {r}: its own norm is not below the total"
                coef = min(1.0, ref["max_norms"][i] / (local + 1e-6))
                differs.append(not all(torch.allclose(g * coef, ref["grads"][i][n], **TOL)
                                       for n, g in res["before"][i].items()))
            assert any(differs), f"{where}: per-stage clipping should differ from the global one"
        for r, res in enumerate(ranks):
            assert math.isinf(float(res["inf_total"])), f"{key} rank {r}"
            for n, g in res["inf_grads"].items():
                nonfinite = ~torch.isfinite(g)
                assert bool((g[~nonfinite] == 0).all()), f"{key} rank {r} {n}: finite gradients scale by 0"
                assert int(nonfinite.sum()) == (1 if r == 0 and n == next(iter(res["inf_grads"])) else 0), \
                    f"{key} rank {r} {n}: only the inf element turns NaN"
