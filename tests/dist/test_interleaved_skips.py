"""Interleaved 1F1B runs models whose tensors skip stages (issue #13, new-user review).

Before, ``partition`` refused (and earlier, every rank failed on) an
interleaved plan (``stages_per_rank=2``) of a model whose first stage feeds a
later stage on the same rank or skips stages: a long residual (``LongSkip``), a
mask made once and read by every layer (``MaskBroadcast``; HF DistilBERT's
``expand``). Now:

* a tensor that carries no gradient (a bool mask) has no backward message, in
  the lowering and in the runtime alike (one predicate,
  :func:`pipec.schedule.stage_graph.carries_grad`);
* where one RECV per stage and micro-batch cannot take a rank pair's messages
  in send order, each RECV stays before its compute (validated deadlock-free)
  and the runtime keeps the pair's order per message: Gloo by tag, NCCL by
  receiving in each peer's send order (:mod:`pipec.runtime.pair_order`). Such
  plans partition for both backends, save, load, simulate and run, with the
  whole model's gradients.

NCCL cannot run on CPU, so its matching is emulated on Gloo: no tags (Gloo then
matches a pair's messages in issue order, as NCCL does) and receives posted by
their actions, as on NCCL; a receive out of send order there gets another
message's data or hangs.

Every case: 4 stages on 2 ranks, under ``interleaved-1f1b`` and under a
hand-written V-shaped zero-bubble schedule (I/W split; rank 0 holds stages 0
and 3); gradients checked in one process (``_one_rank``: the real executor in
the schedule's order), and every plan in one 2-rank Gloo run.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _one_rank import one_rank
from _workers import run_ranks
from models import LongSkip
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan
from pipec.runtime.runtime import PipelineRuntime
from pipec.schedule.ir import Schedule, v_placement
from pipec.schedule.stage_graph import carries_grad, graph_of

TOL = {"rtol": 1e-4, "atol": 1e-5}
NUM_MICROBATCHES = 4
BATCH = 8
# a V-shaped zero-bubble schedule: rank 0 runs stages 0 and 3, rank 1 stages 1 and 2
V_SPLIT = Schedule.from_text("""
0: 0F0 0F1 0F2 0F3 3F0 3I0 3F1 3I1 3W0 3F2 3I2 3W1 3F3 3I3 3W2 3W3 0I0 0I1 0I2 0I3 0W0 0W1 0W2 0W3
1: 1F0 2F0 1F1 2F1 1F2 2F2 1F3 2F3 2I0 1I0 2I1 1I1 2W0 2I2 1I2 2W1 2I3 1I3 2W2 2W3 1W0 1W1 1W2 1W3
""", name="v-zb-hand", stages_per_rank=2, placement=v_placement(4, 2))


class MaskBroadcast(nn.Module):
    """A bool mask made once from the input and read by every layer (DistilBERT's
    ``expand``, CLIP text's causal mask): no gradient flows through it."""

    def __init__(self, dim: int = 16, *, float_mask: bool = False) -> None:
        super().__init__()
        self.float_mask = float_mask
        self.stem = nn.Linear(8, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(6))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, :1] > 0
        keep = mask.to(x.dtype)  # floating, but made from the input alone: no gradient to send
        h = torch.tanh(self.stem(x))
        for layer in self.layers:
            if self.float_mask:
                h = keep * torch.tanh(layer(h)) + (1 - keep) * h * 0.5
            else:
                h = torch.where(mask, torch.tanh(layer(h)), h * 0.5)
        return self.head(h)


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    # dropout off: the reference and the pipeline draw different masks
    config = DistilBertConfig(n_layers=4, dim=32, hidden_dim=64, n_heads=2, vocab_size=128,
                              max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return DistilBertForMaskedLM(config)


def _mlm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"].flatten(0, 1), y.flatten())


Case = tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, torch.Tensor], torch.Tensor, Callable[..., torch.Tensor]]


def _case(name: str) -> Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "distilbert":
        ids = torch.randint(0, 128, (BATCH, 12), generator=gen)
        mask = torch.ones(BATCH, 12, dtype=torch.long)
        mask[::2, 9:] = 0  # padding: the mask matters
        return _distilbert(), (ids,), {"attention_mask": mask}, torch.randint(0, 128, (BATCH, 12), generator=gen), _mlm_loss
    model = LongSkip() if name == "long-skip" else MaskBroadcast(float_mask=name == "float-mask")
    return model, (torch.randn(BATCH, 8, generator=gen),), {}, torch.randint(0, 3, (BATCH,), generator=gen), F.cross_entropy


def _plan(case: Case, schedule: str | Schedule = "interleaved-1f1b") -> Plan:
    model, args, kwargs, target, loss_fn = case
    return pipec.partition(model, args, example_kwargs=kwargs or None, num_stages=4, schedule=schedule,
                           stages_per_rank=2, num_microbatches=NUM_MICROBATCHES, loss_fn=loss_fn,
                           target=target, cost_model="h100-sxm")


def _reference(case: Case) -> dict[str, torch.Tensor]:
    model, args, kwargs, target, loss_fn = case
    ref = copy.deepcopy(model)
    loss_fn(ref(*args, **kwargs), target).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _step(plan: Plan, args: Any, kwargs: Any, target: Any, loss_fn: Any = None) -> dict[str, torch.Tensor]:
    pipe = PipelineRuntime(plan, loss_fn)
    for _, p in pipe.named_parameters():  # runtimes of one plan in one process share its stage modules
        p.grad = None
    pipe.step(*args, target=target, **kwargs)
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got, f"{where}: no gradients at all"
    for name in sorted(set(got) | set(want)):
        g, w = got.get(name), want.get(name)
        if g is None or w is None:  # a zero gradient may be absent on one side
            present = g if g is not None else w
            assert present is not None and not present.any(), f"{where}: {name} has a gradient on one side only"
            continue
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"{where}: {name}: {m}")


CASES = ("long-skip", "mask-broadcast", "float-mask", "distilbert")


@pytest.fixture(scope="module")
def plans() -> dict[str, tuple[Case, Plan]]:
    out = {}
    for name in CASES:
        case = _case(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # runnable on every backend: no warning
            out[name] = (case, _plan(case))
    return out


@pytest.fixture(scope="module")
def v_plans() -> dict[str, tuple[Case, Plan]]:
    out = {}
    for name in CASES:
        case = _case(name)
        out[name] = (case, _plan(case, V_SPLIT))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
def test_v_shaped_zero_bubble_plan_with_skips_gives_the_reference_gradients(
    name: str, v_plans: dict[str, tuple[Case, Plan]], tmp_path: Path
) -> None:
    case, plan = v_plans[name]
    assert plan.data.schedule.placement == (0, 1, 1, 0) and set(plan.data.lowered) == {"gloo", "nccl"}
    plan.simulate()
    plan.save(tmp_path / "plan")
    _, args, kwargs, target, loss_fn = case
    loaded = one_rank(pipec.load(tmp_path / "plan"))  # the saved stage files, run
    _assert_grads(_step(loaded, args, kwargs, target, loss_fn), _reference(case), name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
def test_interleaved_plan_with_skips_partitions_for_every_backend_and_simulates(
    name: str, plans: dict[str, tuple[Case, Plan]], tmp_path: Path
) -> None:
    _, plan = plans[name]
    assert plan.schedule.name == "interleaved-1f1b" and plan.data.stages_per_rank == 2
    skips = [b for b in plan.boundaries if any(c != b.producer_stage + 1 for c in b.consumer_stages)]
    assert skips, "the split should have a tensor that skips stages"
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    sim = plan.simulate()
    assert sim.schedule == plan.data.lowered["nccl"] and sim.step_time > 0
    plan.save(tmp_path / "plan")
    loaded = pipec.load(tmp_path / "plan")
    assert loaded.data.lowered == plan.data.lowered
    assert loaded.simulate().step_time == pytest.approx(sim.step_time)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
def test_interleaved_plan_with_skips_gives_the_reference_gradients_in_one_process(
    name: str, plans: dict[str, tuple[Case, Plan]]
) -> None:
    case, plan = plans[name]
    if name == "float-mask":
        assert any(b.dtype == "float32" and len(b.consumer_stages) > 1 for b in plan.boundaries)
    _, args, kwargs, target, _ = case
    _assert_grads(_step(one_rank(plan), args, kwargs, target), _reference(case), name)


def test_a_mask_has_no_backward_message() -> None:
    """The bool mask crosses ranks forward, and no SEND_B/RECV_B carries it back."""
    plan = _plan(_case("mask-broadcast"))
    masks = [b for b in plan.boundaries if b.dtype == "bool"]
    assert masks and not any(carries_grad(b) for b in masks)
    graph = graph_of(plan.data.lowered["gloo"], plan.boundaries)
    floating = {(b.producer_stage, c) for b in plan.boundaries if carries_grad(b) for c in b.consumer_stages}
    mask_only = {(b.producer_stage, c) for b in masks for c in b.consumer_stages} - floating
    assert mask_only, "some edge should carry the mask alone"
    for p, c in mask_only:
        assert c not in graph.backward_consumers(p) and p not in graph.backward_producers(c)
    sent = {(m.src_stage, m.dst_stage, m.forward) for row in plan.data.lowered["gloo"].actions for a in row
            for m in graph.messages(a)}
    assert {(p, c, True) for p, c in mask_only if graph.rank_of(p) != graph.rank_of(c)} <= sent
    assert {(dst, src) for src, dst, forward in sent if not forward} <= floating


def _larger_batch(case: Case) -> Case:
    """``case`` on a batch 3 times the plan's: each rank's first step of it learns its shapes."""
    model, _, _, _, loss_fn = case
    gen = torch.Generator().manual_seed(2)
    return model, (torch.randn(3 * BATCH, 8, generator=gen),), {}, torch.randint(0, 3, (3 * BATCH,), generator=gen), loss_fn


def _gloo_steps(rank: int, world_size: int, runs: dict[str, tuple[Plan, Any, Any, Any]]) -> dict[str, Any]:
    return {key: _step(plan, args, kwargs, target) for key, (plan, args, kwargs, target) in runs.items()}


@pytest.mark.timeout(300)
def test_plans_with_skips_on_two_gloo_ranks(
    plans: dict[str, tuple[Case, Plan]], v_plans: dict[str, tuple[Case, Plan]]
) -> None:
    every = {**{f"interleaved {k}": v for k, v in plans.items()}, **{f"v {k}": v for k, v in v_plans.items()}}
    every["interleaved long-skip, a larger batch"] = (_larger_batch(plans["long-skip"][0]), plans["long-skip"][1])
    runs = {key: (plan, case[1], case[2], case[3]) for key, (case, plan) in every.items()}
    per_rank = run_ranks(_gloo_steps, 2, runs, timeout=240)
    for key, (case, _) in every.items():
        got: dict[str, torch.Tensor] = {}
        for r in per_rank:
            got.update(r[key])
        _assert_grads(got, _reference(case), f"{key} on 2 Gloo ranks")


def _nccl_like_steps(rank: int, world_size: int, runs: dict[str, tuple[Plan, Any, Any, Any]]) -> dict[str, Any]:
    """:func:`_gloo_steps` with NCCL's matching emulated on Gloo (module doc): this process
    is a forked child, so the patches end with it."""
    from pipec.runtime import comm
    from pipec.runtime import runtime as runtime_module

    init, lowered = comm.P2P.__init__, runtime_module.lowered_schedule

    def p2p_as_nccl(self: comm.P2P, info: comm.ProcessGroupInfo, *args: Any, **kwargs: Any) -> None:
        init(self, dataclasses.replace(info, backend="nccl"), *args, **kwargs)

    comm.P2P.__init__ = p2p_as_nccl  # type: ignore[method-assign]
    runtime_module.lowered_schedule = lambda plan, backend: lowered(plan, "nccl")  # type: ignore[assignment]
    out = _gloo_steps(rank, world_size, runs)
    for key, (plan, args, kwargs, _) in runs.items():  # inference: the forward-only actions' order
        out[f"{key} forward"] = PipelineRuntime(plan).forward(*args, **kwargs)
    return out


@pytest.mark.timeout(300)
def test_plans_with_skips_on_two_ranks_matching_messages_in_issue_order_as_nccl(
    plans: dict[str, tuple[Case, Plan]], v_plans: dict[str, tuple[Case, Plan]]
) -> None:
    every = {**{f"interleaved {k}": v for k, v in plans.items()}, **{f"v {k}": v for k, v in v_plans.items()}}
    # a larger batch than the plan's: a step that learns its shapes (a header before each tensor)
    every["interleaved long-skip, a larger batch"] = (_larger_batch(plans["long-skip"][0]), plans["long-skip"][1])
    runs = {key: (plan, case[1], case[2], case[3]) for key, (case, plan) in every.items()}
    per_rank = run_ranks(_nccl_like_steps, 2, runs, timeout=120)
    for key, (case, plan) in every.items():
        got: dict[str, torch.Tensor] = {}
        for r in per_rank:
            got.update(r[key])
        _assert_grads(got, _reference(case), f"{key} on 2 ranks, NCCL's matching")
        model, args, kwargs, _, _ = case
        last = per_rank[plan.data.schedule.rank_of(plan.num_stages - 1)][f"{key} forward"]
        want = model(*args, **kwargs)
        torch.testing.assert_close(last["logits"] if isinstance(want, dict) else last,
                                   want["logits"] if isinstance(want, dict) else want, **TOL)
