"""Hand-made plans for testing the executor without the partitioner.

A plan whose stage modules are built here (an MLP cut into contiguous slices,
optionally with a skip tensor from stage 0 to the last stage and a weight tied
between the first and last stage) and a naive lowering that adds SEND/RECV
around every compute action that needs them. The executor must not care where
its plan came from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from pipec.facade import Plan
from pipec.plan import Boundary, InputSpec, PlanData, StageInfo, TiedGroup
from pipec.schedule.ir import Action, ActionKind, Schedule
from pipec.types import TensorMeta


class Chain(nn.Module):
    """blocks[0..n): Linear(d, d)+tanh; out = head(h_n + skip * h_1); head tied to blocks.0 (optional)."""

    def __init__(self, num_blocks: int, dim: int = 8, skip: bool = False, tied: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_blocks))
        self.head = nn.Linear(dim, dim)
        self.skip = skip
        if tied:
            self.head.weight = self.blocks[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        first = None
        for i, b in enumerate(self.blocks):
            h = torch.tanh(b(h))
            if i == 0:
                first = h
        if self.skip:
            assert first is not None
            h = h + first
        return self.head(h)


class ChainStage(nn.Module):
    """Blocks ``lo..hi`` of a :class:`Chain`, keeping their FQNs ``blocks.<i>.*``."""

    def __init__(self, model: Chain, index: int, bounds: Sequence[int], tied: bool) -> None:
        super().__init__()
        lo, hi = bounds[index], bounds[index + 1]
        num_stages = len(bounds) - 1
        self.index = index
        self.is_last = index == num_stages - 1
        self.blocks = nn.Module()
        for i in range(lo, hi):
            self.blocks.add_module(str(i), copy.deepcopy(model.blocks[i]))
        self.skip = model.skip and num_stages > 1
        names = ["x"] if index == 0 else [f"h{index - 1}"]
        if self.skip and self.is_last:
            names.append("s0")
        self.input_names = tuple(names)
        outs = [] if self.is_last else [f"h{index}"]
        if self.skip and index == 0:
            outs.append("s0")
        self.output_names = tuple(outs)
        if self.is_last:
            self.head = copy.deepcopy(model.head)
            if tied:
                if index == 0:
                    self.head.weight = self.blocks.get_submodule("0").weight
                else:  # a copy under the canonical FQN, as split does
                    self.blocks.add_module("0", nn.Module())
                    self.blocks.get_submodule("0").weight = nn.Parameter(model.blocks[0].weight.detach().clone())
                    self.head.weight = self.blocks.get_submodule("0").weight

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = inputs[0]
        first = None
        for name, b in self.blocks.named_children():
            if isinstance(b, nn.Linear):
                h = torch.tanh(b(h))
                if name == "0":
                    first = h
        outs: list[torch.Tensor] = []
        if not self.is_last:
            outs.append(h)
        if self.skip and self.index == 0:
            assert first is not None
            outs.append(first)
        if self.is_last:
            if self.skip:
                h = h + (first if self.index == 0 else inputs[1])
            return (*outs, self.head(h))
        return tuple(outs)


def naive_lower(schedule: Schedule, boundaries: Sequence[Boundary]) -> Schedule:
    """RECV before and SEND after each compute action, wherever a peer is on another rank."""
    rank_of = schedule.rank_of
    feeds: dict[int, set[int]] = {}
    for b in boundaries:
        for c in b.consumer_stages:
            feeds.setdefault(c, set()).add(b.producer_stage)
    rows = []
    for rank, row in enumerate(schedule.actions):
        out: list[Action] = []
        for a in row:
            remote_in = any(rank_of(p) != rank for p in feeds.get(a.stage, ()))
            remote_out = any(
                rank_of(c) != rank for b in boundaries if b.producer_stage == a.stage for c in b.consumer_stages
            )
            if a.kind == ActionKind.F:
                if remote_in:
                    out.append(Action(a.stage, ActionKind.RECV_F, a.microbatch))
                out.append(a)
                if remote_out:
                    out.append(Action(a.stage, ActionKind.SEND_F, a.microbatch))
            elif a.kind in (ActionKind.B, ActionKind.I):
                if remote_out:
                    out.append(Action(a.stage, ActionKind.RECV_B, a.microbatch))
                out.append(a)
                if remote_in:
                    out.append(Action(a.stage, ActionKind.SEND_B, a.microbatch))
            else:
                out.append(a)
        rows.append(tuple(out))
    return schedule.model_copy(update={"actions": tuple(rows)})


def chain_plan(
    model: Chain,
    schedule: Schedule,
    *,
    batch: int,
    bounds: Sequence[int],
    tied: bool = False,
    lower: bool = True,
) -> Plan:
    num_stages = len(bounds) - 1
    m = schedule.num_microbatches
    dim = model.head.in_features
    meta = TensorMeta(shape=(batch // m, dim), dtype="float32", num_bytes=batch // m * dim * 4)
    boundaries = [
        Boundary(name=f"h{s}", producer_stage=s, consumer_stages=(s + 1,), shape=meta.shape, dtype="float32", num_bytes=meta.num_bytes)
        for s in range(num_stages - 1)
    ]
    if model.skip and num_stages > 1:
        boundaries.append(
            Boundary(name="s0", producer_stage=0, consumer_stages=(num_stages - 1,), shape=meta.shape, dtype="float32", num_bytes=meta.num_bytes)
        )
    stages = tuple(
        StageInfo(index=s, rank=schedule.rank_of(s), nodes=(), num_params=0, param_bytes=0, forward_time=0.0,
                  backward_time=0.0, comm_time=0.0, memory_bytes=0)
        for s in range(num_stages)
    )
    tied_groups = ()
    if tied and num_stages > 1:
        tied_groups = (TiedGroup(fqn="blocks.0.weight", aliases=("head.weight",), stages=(0, num_stages - 1), num_bytes=dim * dim * 4),)
    data = PlanData(
        model_name="Chain", trace_method="hand", num_stages=num_stages, num_ranks=schedule.num_ranks,
        stages_per_rank=schedule.stages_per_rank, num_microbatches=m, batch_size=batch, strategy="hand",
        cost_model="none", schedule=naive_lower(schedule, boundaries) if lower else schedule, stages=stages,
        boundaries=tuple(boundaries), node_costs={}, tied_groups=tied_groups,
        inputs=(InputSpec(name="x", meta=meta),), bottleneck=0.0, lower_bound=0.0,
    )
    return Plan(data, loss_fn=lambda out, y: ((out - y) ** 2).mean(),
                stage_modules={s: ChainStage(model, s, bounds, tied) for s in range(num_stages)})
