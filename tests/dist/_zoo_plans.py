"""Plans of the test model zoo, built cheaply in the test process.

Each model is traced once on one micro-batch and costed with a uniform cost
per node (no profiling); stages get about equal node counts
(``pipec.partitioner.baselines.equal_count``, which only cuts where a plain
tensor crosses) and :func:`plan_from_split` assembles the plan. Gradients must
match whatever the split is, so the split need not be a good one.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from models import example
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.partitioner.baselines import equal_count
from pipec.partitioner.graph import build_chain
from pipec.types import NodeCost, TracedGraph

MODELS = ("mlp", "resnet", "tied", "two_input", "gpt2")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def _classify(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _gpt2(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"].flatten(0, 1), y.flatten())


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    traced: TracedGraph
    loss_fn: Callable[..., torch.Tensor]
    batches: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]  # (full-batch inputs, target) per step


def _target(name: str, out: Any, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    if name == "resnet":
        return torch.randint(0, 10, (batch,), generator=gen), _classify
    if name == "tied":
        return torch.randint(0, 64, out.shape[:2], generator=gen), _lm
    if name == "gpt2":
        return torch.randint(0, 128, out["logits"].shape[:2], generator=gen), _gpt2
    return torch.randn(out.shape, generator=gen), _mse


def zoo_model(name: str, *, microbatch: int, num_microbatches: int, steps: int) -> ZooModel:
    """The zoo model ``name`` traced on one micro-batch, with ``steps`` full batches."""
    model, mb_inputs = example(name, batch=microbatch)
    model.train()
    traced = pipec.trace(model, mb_inputs)
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, and the data with them
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    batch = microbatch * num_microbatches
    batches = []
    for _ in range(steps):
        inputs = tuple(
            torch.randint(0, int(t.max()) + 1, (batch, *t.shape[1:]), generator=gen)
            if not t.is_floating_point() else torch.randn((batch, *t.shape[1:]), generator=gen)
            for t in mb_inputs
        )
        with torch.no_grad():
            out = model(*inputs)
        target, loss_fn = _target(name, out, batch, gen)
        batches.append((inputs, target))
    return ZooModel(name, model, traced, loss_fn, batches)


def zoo_plan(zm: ZooModel, *, num_ranks: int, schedule: str, num_microbatches: int,
             precision: str = "fp32") -> Plan:
    """``zm`` on ``num_ranks`` ranks under ``schedule`` (two stages per rank when interleaved)."""
    spr = 2 if schedule.startswith("interleaved") else 1
    num_stages = num_ranks * spr
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in zm.traced.nodes}
    chain = build_chain(zm.traced, costs, num_stages=num_stages, num_ranks=num_ranks,
                        schedule=schedule, num_microbatches=num_microbatches)
    cuts = equal_count(chain.problem)
    data = plan_from_split(zm.traced, costs, list(cuts[1:-1]), schedule=schedule,
                           num_microbatches=num_microbatches, stages_per_rank=spr, precision=precision)
    return Plan(data, traced=zm.traced, loss_fn=zm.loss_fn)


def reference_training(zm: ZooModel, *, lr: float) -> dict[str, Any]:
    """Single-process SGD on the full batches: losses, first-step gradients, final parameters."""
    model = copy.deepcopy(zm.model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], None
    for inputs, target in zm.batches:
        opt.zero_grad()
        loss = zm.loss_fn(model(*inputs), target)
        loss.backward()
        losses.append(loss.detach())
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}
