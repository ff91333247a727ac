"""Planning runs as few forwards as it can, with the same results: export metas come
from export's fake values, fx graphs run once for both the check and the metas, and
the analytic model counts each distinct op once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import ZOO, example
from torch import nn

import pipec
from pipec.costs import analytic
from pipec.types import TensorMeta


class CountingLinear(nn.Linear):
    """Counts its forwards on real tensors (tracing calls it on proxies or fake tensors)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy) and not torch._guards.detect_fake_mode(x):
            CountingLinear.calls += 1
        return super().forward(x)


def _real_run(traced: pipec.TracedGraph) -> tuple[dict[str, tuple[TensorMeta, ...]], dict[str, bool]]:
    """Each node's output tensors and whether it is one tensor, from running the graph on
    the example inputs with torch.fx's own interpreter (independent of pipec's tracing)."""
    metas: dict[str, tuple[TensorMeta, ...]] = {}
    is_tensor: dict[str, bool] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            leaves: list[torch.Tensor] = []
            torch.fx.node.map_aggregate(out, lambda x: leaves.append(x) if isinstance(x, torch.Tensor) else None)
            metas[n.name] = tuple(TensorMeta(shape=tuple(x.shape), dtype=str(x.dtype).removeprefix("torch."),
                                             num_bytes=x.numel() * x.element_size()) for x in leaves)
            is_tensor[n.name] = isinstance(out, torch.Tensor)
            return out

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Recorder(traced.graph_module).run(*traced.example_inputs)
    return metas, is_tensor


@pytest.mark.parametrize("name", ZOO)
def test_export_metas_from_fake_values_equal_a_real_run(name: str) -> None:
    model, inputs = example(name, batch=2)
    traced = pipec.trace(model, inputs, method="export")
    metas, is_tensor = _real_run(traced)
    for node in traced.nodes:
        assert node.outputs == metas[node.name], node.name
        assert node.is_tensor == is_tensor[node.name], node.name


def test_fx_runs_eager_and_graph_once_and_export_runs_nothing() -> None:
    model = nn.Sequential(CountingLinear(4, 4), nn.ReLU())
    CountingLinear.calls = 0
    pipec.trace(model, (torch.randn(2, 4),), method="fx", leaf_modules=[CountingLinear])
    assert CountingLinear.calls == 2  # the eager reference, and one graph run for check + metas
    CountingLinear.calls = 0
    pipec.trace(model, (torch.randn(2, 4),), method="export")
    assert CountingLinear.calls == 0


def test_wrong_inputs_still_name_the_model_with_export() -> None:
    model, _ = example("mlp")
    with pytest.raises(pipec.PipecError, match="fails on the example inputs"):
        pipec.trace(model, (torch.randn(2, 5),), method="export")


def test_lazy_modules_are_materialised_before_tracing() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    traced = pipec.trace(model, (torch.randn(2, 5),), method="export")
    assert any(n.params for n in traced.nodes)


@pytest.mark.parametrize(("name", "method", "dtype"),
                         [("gpt2", "export", None), ("resnet", "fx", "bf16"), ("tied", "fx", None)])
def test_cached_counts_equal_counting_every_node(name: str, method: str, dtype: str | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = example(name, batch=2)
    traced = pipec.trace(model, inputs, method=method)
    cached = pipec.load_cost_model("h100-sxm", dtype=dtype)
    with monkeypatch.context() as m:
        m.setattr(analytic, "count_key", lambda run: None)
        full = pipec.load_cost_model("h100-sxm", dtype=dtype)
        expected = full.count(traced), full.node_costs(traced)
    assert (cached.count(traced), cached.node_costs(traced)) == expected
