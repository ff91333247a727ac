"""Modes and randomness on Gloo ranks (issue #13).

- ``pipe.eval()``: ``pipe.forward`` is the model's eval output and leaves the
  buffers alone; ``pipe.train()`` brings batch statistics back.
- Dropout: with one seed, a 2-stage and a 4-stage plan train identically under
  gpipe, 1f1b and zb-h1, and :func:`pipec.reference_step` reproduces them in
  one process; another step draws other masks.
- BatchNorm: pipelined gradients are those of micro-batch accumulation.

One process-group launch per world size runs every case.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.partitioner.baselines import equal_count
from pipec.partitioner.graph import build_chain
from pipec.types import NodeCost

SCHEDULES = ("gpipe", "1f1b", "zb-h1")
NUM_MICROBATCHES = 4
MICROBATCH = 2
SEED = 1234
STEPS = 2


class DropNet(nn.Module):
    """Linear/ReLU/Dropout blocks, one functional dropout: random nodes on every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3)) for _ in range(4))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(F.dropout(x, 0.2, training=self.training))


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn1 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.l2, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn2(self.l2(torch.relu(self.bn1(self.l1(x)))))))


def _plan(model: nn.Module, num_stages: int, schedule: str, method: str = "export") -> Plan:
    traced = pipec.trace(model, (torch.randn(MICROBATCH, 8),), method=method)
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}
    chain = build_chain(traced, costs, num_stages=num_stages, num_ranks=num_stages,
                        schedule=schedule, num_microbatches=NUM_MICROBATCHES)
    cuts = equal_count(chain.problem)
    data = plan_from_split(traced, costs, list(cuts[1:-1]), schedule=schedule,
                           num_microbatches=NUM_MICROBATCHES)
    return Plan(data, traced=traced, loss_fn=F.mse_loss)


def _grads(pipe: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _run(rank: int, world_size: int, cases: dict[str, tuple[str, Plan | str, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    for name, (kind, plan, x, y) in cases.items():
        pipe = PipelineRuntime(plan, loss_fn=F.mse_loss, seed=SEED)
        try:
            if kind == "modes":
                before = {k: v.clone() for k, v in pipe.state_dict().items()}
                pipe.eval()
                forward = pipe.forward(x)
                after_eval = {k: v.clone() for k, v in pipe.state_dict().items()}
                pipe.train()
                pipe.step(x, target=y)
                out[name] = {"forward": forward, "before": before, "after_eval": after_eval,
                             "after_train": {k: v.clone() for k, v in pipe.state_dict().items()}}
            else:
                losses, grads = [], []
                for _ in range(STEPS):
                    for p in pipe.parameters():
                        p.grad = None
                    losses.append(pipe.step(x, target=y))
                    grads.append(_grads(pipe))
                out[name] = {"losses": losses, "grads": grads}
        finally:
            pipe.close()
    return out


def _merged(results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    losses = next(r[name]["losses"] for r in results if r[name]["losses"][0] is not None)
    grads: list[dict[str, torch.Tensor]] = [{} for _ in range(STEPS)]
    for r in results:
        for s in range(STEPS):
            grads[s].update(r[name]["grads"][s])
    return {"losses": losses, "grads": grads}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"gradient of {k} differs: {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    torch.manual_seed(0)
    batch = MICROBATCH * NUM_MICROBATCHES
    return {"drop": DropNet(), "bn": BNNet(), "x": torch.randn(batch, 8), "y": torch.randn(batch, 4)}


@pytest.mark.timeout(300)
def test_two_ranks_modes_dropout_and_batch_norm(data: dict[str, Any], tmp_path: Path) -> None:
    x, y = data["x"], data["y"]
    bn = data["bn"]
    cases: dict[str, Any] = {f"drop-{s}": ("train", _plan(data["drop"], 2, s), x, y) for s in SCHEDULES}
    cases["modes"] = ("modes", _plan(bn, 2, "1f1b"), x, y)
    cases["modes-saved"] = ("modes", str(_plan(bn, 2, "gpipe").save(tmp_path / "plan")), x, y)
    cases["bn-accumulation"] = ("train", _plan(bn, 2, "1f1b"), x, y)
    results = run_ranks(_run, 2, cases, timeout=240)

    # eval: the model's eval output, buffers untouched; train: batch statistics again
    ref = copy.deepcopy(bn).eval()
    for r, case in ((r, case) for r in results for case in ("modes", "modes-saved")):
        modes = r[case]
        if modes["forward"] is not None:
            with torch.no_grad():
                per_microbatch = torch.cat([ref(c) for c in x.chunk(NUM_MICROBATCHES)])
                assert torch.equal(modes["forward"], per_microbatch), case
                torch.testing.assert_close(modes["forward"], ref(x), rtol=1e-6, atol=1e-6)
        _same(modes["before"], modes["after_eval"])
        assert any(not torch.equal(modes["before"][k], modes["after_train"][k]) for k in modes["before"]
                   if k.endswith("running_mean"))
        for k, v in modes["after_train"].items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == NUM_MICROBATCHES  # one per micro-batch, none for the eval forward

    # BatchNorm: gradients of micro-batch accumulation, the model run on each micro-batch
    model = copy.deepcopy(bn).train()
    for xc, yc in zip(x.chunk(NUM_MICROBATCHES), y.chunk(NUM_MICROBATCHES)):
        (F.mse_loss(model(xc), yc) / NUM_MICROBATCHES).backward()
    got = _merged(results, "bn-accumulation")["grads"][0]
    _same(got, {n: p.grad for n, p in model.named_parameters()})

    # dropout: every schedule of the 2-stage plan, and the single-process reference
    plan = cases["drop-gpipe"][1]
    for step in range(STEPS):
        ref_step = pipec.reference_step(plan, x, target=y, seed=SEED, step=step)
        for s in SCHEDULES:
            run = _merged(results, f"drop-{s}")
            assert torch.equal(run["losses"][step], ref_step.loss), s
            _same(run["grads"][step], ref_step.grads)
    first, second = (pipec.reference_step(plan, x, target=y, seed=SEED, step=k) for k in range(2))
    assert not torch.equal(first.loss, second.loss), "steps 0 and 1 drew the same masks"
    other = pipec.reference_step(plan, x, target=y, seed=SEED + 1, step=0)
    assert not torch.equal(first.loss, other.loss), "seeds draw the same masks"


@pytest.mark.timeout(300)
def test_four_stages_train_as_two_stages(data: dict[str, Any]) -> None:
    x, y = data["x"], data["y"]
    cases = {f"drop-{s}": ("train", _plan(data["drop"], 4, s), x, y) for s in SCHEDULES}
    results = run_ranks(_run, 4, cases, timeout=240)
    two_stage = _plan(data["drop"], 2, "1f1b")
    for step in range(STEPS):
        ref_step = pipec.reference_step(two_stage, x, target=y, seed=SEED, step=step)
        for s in SCHEDULES:
            run = _merged(results, f"drop-{s}")
            assert torch.equal(run["losses"][step], ref_step.loss), s
            _same(run["grads"][step], ref_step.grads)


def test_seed_must_be_a_natural_number(data: dict[str, Any]) -> None:
    from pipec.errors import ConfigError
    from pipec.runtime.runtime import PipelineRuntime

    plan = _plan(data["drop"], 2, "1f1b")
    for bad in (-1, 1.5, True, "7"):
        with pytest.raises(ConfigError, match="seed: expected an int >= 0"):
            PipelineRuntime(plan, seed=bad)  # type: ignore[arg-type]
