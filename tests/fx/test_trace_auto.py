"""Models a user meets with the defaults trace into a plan that saves, loads and runs (issue #13).

Regressions:
- a ``torch.fx.wrap``'ed function (torchvision's stochastic depth, as in
  EfficientNet) put fx's ``wrap("fn")`` inside the stage class: importing
  ``stage_0.py`` failed with "wrap must be called at the top level of a module";
- a ``**kwargs`` in forward (HF EfficientNet) left an fx placeholder the graph
  could not be called with (profiling failed);
- ``method="auto"`` kept an fx graph with modules no tracer can inline
  (``nn.MultiheadAttention`` called with keywords, as in a ViT), so
  ``plan.save`` failed; auto now checks at trace time and uses export;
- an HF config with the default ``use_cache=True`` failed with a cut message
  advising ``torch.cond``; it is now traced with ``use_cache=False`` and a
  warning, and an error (``use_cache=True`` asked for) keeps the whole text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from test_split_models import assert_same_output, run_chain
from torch import nn

import pipec
from pipec.errors import PlanError, TraceError

transformers = pytest.importorskip("transformers")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth; wrapped: fx cannot trace the Python branch on ``training``."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], 1, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("drop_path")


class DropPathMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(torch.relu(self.a(x)), 0.2, self.training)
        x = x + drop_path(torch.relu(self.b(x)), 0.2, self.training)
        return self.c(x)


class TinyViT(nn.Module):
    """A ViT as torchvision writes it: ``nn.MultiheadAttention`` called with keywords."""

    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        for norm, attn, mlp in zip(self.norms, self.attn, self.mlps):
            y = norm(h)
            h = h + attn(y, y, y, need_weights=False)[0]
            h = h + mlp(h)
        return self.head(h.mean(dim=1))


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: export cannot capture it, fx only as a leaf
            return x * 2
        return x - 1


class WithBranchyLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.branch, self.b = nn.Linear(8, 8), Branchy(), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.branch(self.a(x)))


def _saved_plan_runs(model: nn.Module, inputs: tuple[Any, ...], directory: Path, **kwargs: Any) -> pipec.Plan:
    """Partition (one micro-batch), save, load; every stage of the loaded plan imports and
    the chain of stages reproduces the model."""
    plan = pipec.partition(model, inputs, num_stages=2, num_microbatches=1, **kwargs)
    flat = plan.traced.flatten_inputs(inputs) if plan.traced is not None else inputs
    saved = plan.save(directory)
    loaded = pipec.load(saved)
    with torch.no_grad():
        got, _ = run_chain(loaded, flat)
        expected = model(*inputs)
    assert_same_output(got, expected)
    return plan


# -- 3a: stage code of fx.wrap'ed functions and **kwargs --------------------------------------


@pytest.mark.parametrize("method", ["fx", "auto"])
def test_fx_wrapped_function_stage_code_imports_and_runs(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DropPathMLP().eval()
    plan = _saved_plan_runs(model, (torch.randn(2, 8),), tmp_path / "plan", method=method)
    assert plan.data.trace_method == "fx"
    text = (tmp_path / "plan" / "stage_0.py").read_text()
    wrap_line = next(line for line in text.splitlines() if "wrap(" in line)
    assert not wrap_line.startswith(" ")  # at the top level of the module, not in the class


def test_hf_efficientnet_plan_saves_loads_and_runs(tmp_path: Path) -> None:
    cfg = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=3,
        kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 24], depthwise_padding=[], strides=[1, 2],
        num_block_repeats=[1, 1], expand_ratios=[1, 6])
    torch.manual_seed(0)
    model = transformers.EfficientNetForImageClassification(cfg).eval()
    _saved_plan_runs(model, (torch.randn(2, 3, 32, 32),), tmp_path / "plan")


def test_an_unused_kwargs_placeholder_is_dropped_from_the_fx_graph() -> None:
    class TakesKwargs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.lin(x)

    x = torch.randn(2, 4)
    traced = pipec.trace(TakesKwargs(), (x,), method="fx")
    assert traced.input_names == ("x",)
    torch.testing.assert_close(traced.graph_module(*traced.flatten_inputs((x,))), traced.graph_module.lin(x))


# -- 3b: auto picks a method whose plan can be saved -------------------------------------------


def test_auto_uses_export_when_fx_keeps_a_module_it_cannot_inline(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    with caplog.at_level(logging.INFO, logger="pipec.tracing"):
        plan = _saved_plan_runs(model, (torch.randn(2, 3, 16, 16),), tmp_path / "plan")
    assert plan.data.trace_method == "export"
    said = [r.getMessage() for r in caplog.records if r.name == "pipec.tracing"]
    assert any("traced TinyViT with export, since fx:" in m and "attn.0 (MultiheadAttention)" in m
               and "could not be written as stage code" in m for m in said), said


def test_forced_fx_warns_at_trace_time_that_the_plan_cannot_be_saved(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    model = TinyViT().eval()
    with caplog.at_level(logging.WARNING, logger="pipec.tracing"):
        plan = pipec.partition(model, (torch.randn(2, 3, 16, 16),), num_stages=2, num_microbatches=1,
                               method="fx", cost_model="h100-sxm")
    assert plan.data.trace_method == "fx"
    assert any("plan.save() will fail" in r.getMessage() for r in caplog.records)
    with pytest.raises(PlanError, match="method='export'"):
        plan.save(tmp_path / "plan")


def test_auto_keeps_the_fx_graph_when_export_fails_too(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = WithBranchyLeaf()
    x = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger="pipec.tracing"):
        traced = pipec.trace(model, (x,), leaf_modules=[Branchy])
    assert traced.method == "fx"
    assert any("plan.save() cannot write its stages" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(traced.graph_module(x), model(x))


def test_hf_vit_with_the_defaults_saves_loads_and_runs(tmp_path: Path) -> None:
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    _saved_plan_runs(model, (torch.randn(2, 3, 16, 16),), tmp_path / "plan")


# -- 3c: HF configs with use_cache=True --------------------------------------------------------


def _gpt2(**extra: Any) -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, **extra))


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_default_use_cache_is_traced_without_the_cache_and_said(make: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = make().eval()
    assert model.config.use_cache is True
    ids = torch.randint(0, 64, (2, 8))
    with caplog.at_level(logging.WARNING, logger="pipec.tracing"):
        plan = pipec.partition(model, (ids,), num_stages=2, num_microbatches=1, cost_model="h100-sxm")
    warned = [r.getMessage() for r in caplog.records if "use_cache=False" in r.getMessage()]
    assert len(warned) == 1 and "model.config.use_cache = False" in warned[0]
    assert model.config.use_cache is True  # the user's config comes back
    directory = plan.save(tmp_path / "plan")
    got, _ = run_chain(pipec.load(directory), plan.traced.flatten_inputs((ids,)))
    assert "past_key_values" not in got.keys()  # noqa: SIM118
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids, use_cache=False).logits)


def test_a_config_without_use_cache_traces_without_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _gpt2(use_cache=False).eval()
    with caplog.at_level(logging.WARNING, logger="pipec.tracing"):
        pipec.trace(model, (torch.randint(0, 64, (2, 8)),))
    assert not [r for r in caplog.records if "use_cache" in r.getMessage()]


def test_use_cache_asked_for_is_an_error_with_the_whole_message_and_the_fix() -> None:
    model = _gpt2().eval()
    with pytest.raises(TraceError) as err:
        pipec.trace(model, (torch.randint(0, 64, (2, 8)),), {"use_cache": True})
    message = str(err.value)
    assert "DynamicCache" in message
    assert "please leave a comment explaining your use case" in message  # not cut at 300 characters
    assert "model.config.use_cache = False" in message and "torch.cond" not in message
