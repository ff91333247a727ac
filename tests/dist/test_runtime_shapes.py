"""Batch size and sequence length are not frozen at planning.

A plan made for batch 8 (4 micro-batches of 2) and sequence length 16 trains,
on 2 Gloo ranks, on batches of 4 and 12 and sequences of 8 and 24 -- shapes
seen the first time (learning steps, with shape headers), seen again, and the
plan's own -- with the loss and every gradient of one process; inference at a
new shape too. HF models (GPT-2, Llama) go through torch.export, traced with
dynamic batch and sequence dims: their stages recompute the sizes the graph's
views read, so they take any batch size and sequence length too. A batch
that does not split into the micro-batches is refused with the sizes that
work; a model whose trace baked the example's shape in (GPT-2 exported on a
micro-batch of one, a size export specialises) fails on every rank, naming
the stage and node.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _one_rank import one_rank
from _workers import run_ranks
from _zoo_plans import ZooModel, zoo_model, zoo_plan
from _zoo_plans import _gpt2 as gpt2_loss
from torch.nn import functional as F

NUM_MICROBATCHES = 4
MICROBATCH = 2
TOL = {"rtol": 1e-4, "atol": 1e-6}
SCHEDULES = ("1f1b", "zb-h1", "interleaved-1f1b")
# (batch, sequence length): new shapes, a repeat, the plan's own, then a new one after it
LM_SHAPES = ((4, 16), (12, 16), (8, 8), (8, 24), (12, 16), (8, 16), (12, 24))
MLP_BATCHES = (4, 12, 8, 12)


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def _batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    if name == "tied":
        return [(torch.randint(0, 64, (b, s), generator=gen), torch.randint(0, 64, (b, s), generator=gen))
                for b, s in LM_SHAPES]
    return [(torch.randn(b, 16, generator=gen), torch.randn(b, 8, generator=gen)) for b in MLP_BATCHES]


def _train(rank: int, world_size: int, cases: dict[str, tuple[Any, Any, list[Any]]]) -> dict[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    for key, (plan, loss_fn, batches) in cases.items():
        pipe = PipelineRuntime(plan, loss_fn)
        # inference at a shape no step has seen, then training on it (the shapes it learnt)
        first = pipe.forward(batches[-1][0])
        steps = []
        for x, y in reversed(batches):
            for p in pipe.parameters():
                p.grad = None
            loss = pipe.step(x, target=y)
            steps.append((loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}))
        out[key] = {"forward": first, "steps": steps[::-1]}
    return out


@pytest.mark.timeout(300)
def test_steps_take_any_batch_size_and_sequence_length() -> None:
    cases: dict[str, tuple[Any, Any, list[Any]]] = {}
    models: dict[str, ZooModel] = {}
    for name, loss_fn in (("tied", lm_loss), ("mlp", mse)):
        zm = zoo_model(name, microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=1)
        if name == "tied":  # trace on sequences of 16
            zm = ZooModel(name, zm.model, _retrace(zm.model, (MICROBATCH, 16)), loss_fn, [])
        models[name] = zm
        for schedule in SCHEDULES:
            plan = zoo_plan(zm, num_ranks=2, schedule=schedule, num_microbatches=NUM_MICROBATCHES)
            assert plan.data.inputs[0].meta is not None
            assert plan.data.inputs[0].meta.shape[0] == MICROBATCH
            cases[f"{name}/{schedule}"] = (plan, loss_fn, _batches(name))
    per_rank = run_ranks(_train, 2, cases, timeout=280)

    for key, (_, loss_fn, batches) in cases.items():
        model = copy.deepcopy(models[key.split("/")[0]].model)
        last = [r[key] for r in per_rank if r[key]["forward"] is not None]
        assert len(last) == 1, key
        with torch.no_grad():
            torch.testing.assert_close(last[0]["forward"], model(batches[-1][0]), **TOL)
        for i, (x, y) in enumerate(batches):
            model.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            what = f"{key}, batch of shape {tuple(x.shape)} (step {i})"
            torch.testing.assert_close(last[0]["steps"][i][0], loss.detach(), **TOL, msg=lambda m, w=what: f"{w}: {m}")
            grads: dict[str, torch.Tensor] = {}
            for r in per_rank:
                grads.update(r[key]["steps"][i][1])
            for n, p in model.named_parameters():
                torch.testing.assert_close(grads[n], p.grad, **TOL, msg=lambda m, w=what, n=n: f"{w} grad {n}: {m}")


# -- HF models through torch.export -----------------------------------------------------

HF_SHAPES = ((4, 16), (12, 16), (8, 8), (8, 24), (12, 24), (8, 16))  # the plan's: batch 8, seq 16


def _hf(name: str) -> ZooModel:
    """A tiny HF ``name`` (gpt2, llama) from a config, traced by default on one micro-batch of
    the plan's batch 8 (4 x 2) and sequence length 16."""
    import transformers

    import pipec

    torch.manual_seed(0)
    if name == "gpt2":
        model: torch.nn.Module = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.train()
    traced = pipec.trace(model, (torch.randint(0, 128, (MICROBATCH, 16)),))
    assert traced.method == "export"
    assert any(n.is_size for n in traced.nodes), "the export kept no size symbolic"
    return ZooModel(name, model, traced, gpt2_loss, [])


def _hf_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randint(0, 128, (b, s), generator=gen), torch.randint(0, 128, (b, s), generator=gen))
            for b, s in HF_SHAPES]


def _hf_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss and gradients of the original model on the whole batch, in one process."""
    model = copy.deepcopy(model)
    loss = gpt2_loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_hf_step(got_loss: Any, got_grads: dict[str, torch.Tensor], model: torch.nn.Module,
                    x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    want_loss, want_grads = _hf_reference(model, x, y)
    torch.testing.assert_close(got_loss, want_loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
    assert set(got_grads) == set(want_grads), what
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, **TOL, msg=lambda m, n=n: f"{what} grad {n}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_hf_model_takes_any_batch_and_sequence_in_one_process(name: str) -> None:
    from pipec.runtime.runtime import PipelineRuntime

    zm = _hf(name)
    plan = zoo_plan(zm, num_ranks=2, schedule="interleaved-1f1b", num_microbatches=NUM_MICROBATCHES)
    sizes = {n.name for n in zm.traced.nodes if n.is_size}
    assert not sizes & {b.name for b in plan.data.boundaries}, "a size crosses stages as a tensor"
    pipe = PipelineRuntime(one_rank(plan), gpt2_loss)
    for x, y in _hf_batches():
        for p in pipe.parameters():
            p.grad = None
        loss = pipe.step(x, target=y)
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        _assert_hf_step(loss, grads, zm.model, x, y, f"{name}, batch of shape {tuple(x.shape)}")


def _train_hf(rank: int, world_size: int, cases: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    for key, plan in cases.items():
        pipe = PipelineRuntime(plan, gpt2_loss)
        logits = pipe.forward(batches[0][0])
        steps = []
        for x, y in batches:
            for p in pipe.parameters():
                p.grad = None
            loss = pipe.step(x, target=y)
            steps.append((loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}))
        out[key] = {"forward": None if logits is None else logits["logits"], "steps": steps}
        pipe.close()
    return out


@pytest.mark.timeout(300)
def test_exported_hf_models_take_any_batch_and_sequence_on_two_gloo_ranks(tmp_path: Path) -> None:
    gpt2, llama = _hf("gpt2"), _hf("llama")
    cases = {
        # through plan.save / pipec.load: the stage files recompute the sizes
        "gpt2/1f1b": str(zoo_plan(gpt2, num_ranks=2, schedule="1f1b",
                                  num_microbatches=NUM_MICROBATCHES).save(tmp_path / "gpt2")),
        "llama/zb-h1": zoo_plan(llama, num_ranks=2, schedule="zb-h1", num_microbatches=NUM_MICROBATCHES),
    }
    batches = _hf_batches()
    per_rank = run_ranks(_train_hf, 2, cases, batches, timeout=280)
    for key, zm in (("gpt2/1f1b", gpt2), ("llama/zb-h1", llama)):
        last = [r[key] for r in per_rank if r[key]["forward"] is not None]
        assert len(last) == 1, key
        with torch.no_grad():
            torch.testing.assert_close(last[0]["forward"], zm.model(batches[0][0])["logits"], **TOL)
        for i, (x, y) in enumerate(batches):
            grads: dict[str, torch.Tensor] = {}
            for r in per_rank:
                grads.update(r[key]["steps"][i][1])
            _assert_hf_step(last[0]["steps"][i][0], grads, zm.model, x, y,
                            f"{key}, batch of shape {tuple(x.shape)} (step {i})")


def _retrace(model: torch.nn.Module, shape: tuple[int, int]) -> Any:
    import pipec

    return pipec.trace(model, (torch.randint(0, 64, shape),))


def _bad_shapes(rank: int, world_size: int, mlp_plan: Any, gpt2_plan: Any, rendezvous: str) -> dict[str, Any]:
    from pipec.errors import ConfigError, PipecError
    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    pipe = PipelineRuntime(mlp_plan, mse)
    try:
        pipe.step(torch.randn(10, 16), target=torch.randn(10, 8))
    except ConfigError as e:
        out["indivisible"] = str(e)
    pipe.close()
    pipe = PipelineRuntime(gpt2_plan, gpt2_loss)
    try:
        pipe.step(torch.randint(0, 128, (8, 16)), target=torch.randint(0, 128, (8, 16)))
    except PipecError as e:
        out["baked"] = (type(e).__name__, str(e))
    # stay until every rank has its error: rank 0 hosts the store that tells the others what failed
    Path(rendezvous, f"done{rank}").touch()
    while not all(Path(rendezvous, f"done{r}").exists() for r in range(world_size)):
        time.sleep(0.05)
    return out


@pytest.mark.timeout(240)
def test_shapes_a_plan_cannot_run_fail_clearly_on_every_rank(tmp_path: Path) -> None:
    mlp = zoo_model("mlp", microbatch=MICROBATCH, num_microbatches=NUM_MICROBATCHES, steps=1)
    # export specialises a dim of size 1 (it cannot tell it from a broadcast): the batch is baked in
    gpt2 = zoo_model("gpt2", microbatch=1, num_microbatches=NUM_MICROBATCHES, steps=1)
    assert gpt2.traced.method == "export"
    reports = run_ranks(
        _bad_shapes, 2,
        zoo_plan(mlp, num_ranks=2, schedule="1f1b", num_microbatches=NUM_MICROBATCHES),
        # through plan.save / pipec.load: the node is named from the generated stage files
        str(zoo_plan(gpt2, num_ranks=2, schedule="1f1b", num_microbatches=NUM_MICROBATCHES).save(tmp_path / "gpt2")),
        str(tmp_path), timeout=200,
    )
    for r in reports:
        assert "a batch of 10 along dim 0 does not split into 4 equal micro-batches" in r["indivisible"]
        assert "e.g. 8 or 12" in r["indivisible"]
        assert "baked" in r, r  # every rank stops with an error, none hangs
    messages = [message for _, message in (r["baked"] for r in reports)]
    # the rank whose stage failed names the stage, the node and the shapes; the other
    # rank stops too and says which rank failed, with the same explanation
    assert all("stage 0, node 'view_" in m and "baked in" in m for m in messages), messages
    assert all("input_ids (2, 16) differ from the plan's input_ids (1, 16)" in m for m in messages), messages
    assert "rank 1 stopped" in messages[1], messages[1]
