"""The default cost model ("profile") on HF models called with keyword inputs.

Regression (issue #13): an export-traced graph kept torch.export's input check,
which matched the flat per-placeholder call against the (args, kwargs) the
model was exported with, so profiling every model given ``labels``,
``attention_mask`` or ``decoder_input_ids`` failed with "kwarg keyword mismatch".
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import pipec

transformers = pytest.importorskip("transformers")
VOCAB = 128


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
                                  use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64,
                                vocab_size=VOCAB, use_cache=False, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(cfg)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[:, -5:] = 0  # padding: the mask changes the output, so it must reach the graph
    return ids, mask


def _cases() -> list[Any]:
    ids, mask = _inputs()
    return [
        pytest.param(_gpt2, {"labels": ids, "attention_mask": mask}, id="gpt2-labels-attention_mask"),
        pytest.param(_bert, {"attention_mask": mask}, id="bert-attention_mask"),
        pytest.param(_t5, {"decoder_input_ids": ids}, id="t5-decoder_input_ids"),
    ]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, dict) or hasattr(value, "items"):
        value = list(value.values())
    return [x for x in torch.utils._pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize(("make", "kwargs"), _cases())
def test_partition_with_the_default_cost_model_profiles_keyword_inputs(make: Any, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = make().eval()
    ids, _ = _inputs()
    plan = pipec.partition(model, (ids,), example_kwargs=kwargs, num_stages=2, num_microbatches=2)
    assert plan.data.cost_model.startswith("profile")
    compute = [c for c in plan.node_costs.values() if c.forward_time > 0]
    assert len(compute) > 10
    assert all(s.forward_time > 0 and s.backward_time > 0 for s in plan.stages)


@pytest.mark.parametrize(("make", "kwargs"), _cases())
def test_the_export_graph_takes_keyword_inputs_flattened(make: Any, kwargs: dict[str, Any]) -> None:
    # what the profiler does: call the graph with one value per placeholder
    torch.manual_seed(0)
    model = make().eval()
    ids, _ = _inputs()
    traced = pipec.trace(model, (ids,), kwargs, method="export")
    flat = traced.flatten_inputs((ids,), kwargs)
    assert len(flat) == 1 + len(kwargs)
    with torch.no_grad():
        got = traced.unflatten_output(traced.graph_module(*flat))
        want = model(ids, **kwargs)
    for g, w in zip(_tensors(got), _tensors(want), strict=True):
        torch.testing.assert_close(g, w)
    prof = pipec.profile(traced, repeats=1, warmup=0, progress=False)
    assert prof.forward_time > 0 and set(prof.nodes) == {n.name for n in traced.nodes}
