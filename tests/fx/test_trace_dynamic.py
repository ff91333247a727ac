"""torch.export traces with dynamic shapes; the split recomputes the sizes in each stage.

Issue #13: a plan made on one batch size and sequence length runs others. An
exported graph keeps every input dim symbolic that the model does not pin
(``Dim.AUTO``); its metas -- what costs and memory are priced on -- are the
example's sizes; its ``sym_size`` nodes (``NodeInfo.is_size``) neither cross
nor pin a cut, and each stage recomputes them from a tensor it holds.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from models import example
from test_split_models import manual_plan, run_chain
from torch import nn

import pipec
from pipec.partitioner.graph import build_chain
from pipec.types import NodeCost


class Flatten(nn.Module):
    """A stage that gets only ``[B*T, 4]`` must read the sizes B and T from the model input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).reshape(-1, 4)
        h = torch.relu(self.b(h))
        return h.reshape(x.shape[0], x.shape[1], 4) * 2


class Branches(nn.Module):
    """Branches on the sequence length: export narrows that dim to a range."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).reshape(x.shape[0], -1)
        if x.shape[1] > 4:
            h = h * 2
        return h.sum(-1)


def test_gpt2_export_keeps_batch_and_sequence_symbolic_with_example_metas() -> None:
    model, (tokens,) = example("gpt2", batch=2)
    traced = pipec.trace(model, (tokens,))
    assert traced.method == "export"
    sizes = [n for n in traced.nodes if n.is_size]
    assert sizes and all(not n.is_tensor and n.outputs == () for n in sizes)
    # the metas are the example's: the embedding is (2, 16, dim)
    embedding = next(n for n in traced.nodes if n.target.endswith("embedding.default"))
    assert embedding.outputs[0].shape[:2] == (2, 16)
    # the graph itself runs at another batch size and sequence length
    other = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        got = traced.unflatten_output(traced.graph_module(*traced.flatten_inputs((other,))))
        torch.testing.assert_close(got["logits"], model(other)["logits"])


def test_sizes_neither_cross_nor_pin_cuts() -> None:
    model, (tokens,) = example("gpt2", batch=2)
    traced = pipec.trace(model, (tokens,))
    costs = {n.name: NodeCost(forward_time=1.0, input_grad_time=0.0, weight_grad_time=0.0) for n in traced.nodes}
    chain = build_chain(traced, costs, num_stages=2)
    sizes = {n.name for n in traced.nodes if n.is_size}
    assert not sizes & set(chain.tensor_names)
    # every layer's views read the batch size: were it a live non-tensor, no cut inside a layer
    assert sum(chain.problem.cuttable) > len(chain.problem.cuttable) // 2


def test_a_stage_without_the_dims_reads_the_model_input_for_them() -> None:
    torch.manual_seed(0)
    model = Flatten()
    traced = pipec.trace(model, (torch.randn(2, 3, 4),), method="export")
    compute = [n for n in traced.nodes if n.op not in ("placeholder", "get_attr", "output")]
    cut = next(i for i, n in enumerate(compute) if n.target.endswith("relu.default")) + 2
    plan = manual_plan(traced, 2, [cut])
    last = plan.stage_module(1)
    assert [b.name for b in plan.data.boundaries] and all(
        len(b.shape) == 2 for b in plan.data.boundaries)  # only the flattened [B*T, 4] crosses
    assert "x" in last.graph_input_names  # the sizes B and T come from the input itself
    for shape in ((2, 3, 4), (5, 7, 4)):
        x = torch.randn(shape)
        out, _ = run_chain(plan, (x,))
        torch.testing.assert_close(out, model(x))


def test_dims_export_narrows_to_a_range_are_pinned(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Branches()
    with caplog.at_level(logging.INFO, logger="pipec.tracing"):
        traced = pipec.trace(model, (torch.randn(3, 6, 4),), method="export")
    assert "limits input dims [(0, 1)]" in caplog.text
    x = next(n for n in traced.graph_module.graph.nodes if n.op == "placeholder").meta["val"]
    assert isinstance(x.shape[0], torch.SymInt) and x.shape[1] == 6  # batch free, sequence pinned
    with torch.no_grad():
        torch.testing.assert_close(traced.graph_module(torch.ones(5, 6, 4))[0], model(torch.ones(5, 6, 4)))


def test_static_export_when_dynamic_export_fails(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    real = torch.export.export

    def export(*args: Any, dynamic_shapes: Any = None, **kwargs: Any) -> Any:
        if dynamic_shapes is not None:
            raise RuntimeError("no dynamic shapes today")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    torch.manual_seed(0)
    model = Flatten()
    with caplog.at_level(logging.INFO, logger="pipec.tracing"):
        traced = pipec.trace(model, (torch.randn(2, 3, 4),), method="export")
    assert "dynamic shapes failed (RuntimeError: no dynamic shapes today)" in caplog.text
    assert not any(n.is_size for n in traced.nodes)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(traced.graph_module(x)[0], model(x))


def test_no_stage_is_made_of_sizes_alone() -> None:
    """Regression: sizes were chain positions of no cost and no boundary, so the optimal
    split of a small Llama put them alone on stage 0 -- a stage that computes nothing."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False))
    plan = pipec.partition(model, (torch.randint(0, 128, (8, 16)),), num_stages=2, num_microbatches=4,
                           cost_model="cpu")
    assert plan.traced is not None and any(n.is_size for n in plan.traced.nodes)
    for stage in plan.stages:
        assert stage.nodes and not any(plan.traced.node(n).is_size for n in stage.nodes), stage.nodes[:5]
        assert stage.num_params > 0  # each stage holds layers
