"""The V-placement tests' shared pieces: the ``Chain`` model traced on a micro-batch of
2 with its data, the single-process reference gradients, one pipeline step's
gradients, and the comparison (tests/dist/test_placement_v.py, test_schedules_new.py)."""

from __future__ import annotations

import copy

import torch
from models import Chain
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.runtime.runtime import PipelineRuntime
from pipec.types import TracedGraph

TOL = {"rtol": 1e-4, "atol": 1e-5}
MICROBATCH = 2


def chain_case(num_microbatches: int) -> tuple[nn.Module, TracedGraph, torch.Tensor, torch.Tensor]:
    """``Chain`` traced on one micro-batch, with a batch of ``num_microbatches`` of them and its target."""
    torch.manual_seed(0)
    model = Chain()
    traced = pipec.trace(model, (torch.randn(MICROBATCH, 6),))
    gen = torch.Generator().manual_seed(1)
    batch = num_microbatches * MICROBATCH
    return model, traced, torch.randn(batch, 6, generator=gen), torch.randn(batch, 3, generator=gen)


def reference_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    F.mse_loss(ref(x), target).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def step_grads(plan: Plan | str, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    pipe = PipelineRuntime(plan, F.mse_loss)  # a plan loaded from disk has no loss_fn of its own
    pipe.step(x, target=target)
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert sorted(got) == sorted(want), where
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, name=name: f"{where}: {name}: {m}")
