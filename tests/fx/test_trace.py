"""Phase 1: the traced graph reproduces the model and is annotated correctly."""

from __future__ import annotations

import pytest
import torch
from models import ZOO, TiedLM, TwoInput, example
from torch import nn

import pipec
from pipec.errors import ConfigError, PipecError, TraceError


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "keys"):
        return [t for k in value.keys() for t in _leaves(value[k])]  # noqa: SIM118
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


@pytest.mark.parametrize("name", ZOO)
def test_traced_graph_reproduces_model(name: str) -> None:
    model, inputs = example(name)
    traced = pipec.trace(model, inputs)
    expected = model(*inputs)
    got = traced.unflatten_output(traced.graph_module(*traced.flatten_inputs(inputs)))
    exp_leaves, got_leaves = _leaves(expected), _leaves(got)
    assert len(exp_leaves) == len(got_leaves) > 0
    for e, g in zip(exp_leaves, got_leaves):
        torch.testing.assert_close(g, e)
    # every node annotated; topological order: inputs come before users
    seen: set[str] = set()
    for node in traced.nodes:
        assert set(node.inputs) <= seen, node.name
        seen.add(node.name)


def test_gpt2_falls_back_to_export_and_keeps_output_keys() -> None:
    model, inputs = example("gpt2")
    traced = pipec.trace(model, inputs)
    assert traced.method == "export"
    out = traced.unflatten_output(traced.graph_module(*traced.example_inputs))
    assert "logits" in out.keys()  # noqa: SIM118
    with pytest.raises(TraceError, match="fx"):
        pipec.trace(model, inputs, method="fx")


def test_methods_can_be_forced() -> None:
    model, inputs = example("mlp")
    assert pipec.trace(model, inputs, method="fx").method == "fx"
    traced = pipec.trace(model, inputs, method="export")
    assert traced.method == "export"
    out = traced.unflatten_output(traced.graph_module(*traced.example_inputs))
    torch.testing.assert_close(out, model(*inputs))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_tied_parameter_appears_once_with_every_user(method: str) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    traced = pipec.trace(model, (torch.randint(0, 64, (2, 5)),), method=method)
    assert "embed.weight" in traced.params
    assert "head.weight" not in traced.params
    info = traced.params["embed.weight"]
    assert "head.weight" in info.aliases
    readers = {traced.node(u).module_path for u in info.users if traced.node(u).op != "get_attr"}
    assert {"embed", "head"} <= readers
    assert traced.param_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_node_annotations_fx() -> None:
    model, inputs = example("mlp", batch=3)
    traced = pipec.trace(model, inputs)
    first = traced.node("layers_0")
    assert first.module_path == "layers.0"
    assert first.params == ("layers.0.weight", "layers.0.bias")
    assert first.param_bytes == (16 * 64 + 64) * 4
    assert first.outputs[0].shape == (3, 64)
    assert first.outputs[0].dtype == "float32"
    assert first.outputs[0].num_bytes == 3 * 64 * 4
    assert traced.input_names == ("x",)


def test_module_paths_export() -> None:
    model, inputs = example("gpt2")
    traced = pipec.trace(model, inputs)
    paths = {n.module_path for n in traced.nodes}
    assert any(p.startswith("transformer.h.1") for p in paths)
    linear_users = [n for n in traced.nodes if "lm_head" in n.module_path]
    assert linear_users and linear_users[-1].params == ("transformer.wte.weight",)


def test_two_inputs_and_kwargs() -> None:
    torch.manual_seed(0)
    model = TwoInput()
    a, b = torch.randn(2, 8), torch.randn(2, 4)
    traced = pipec.trace(model, (a,), {"b": b})
    assert len(traced.input_names) == 2
    got = traced.graph_module(*traced.flatten_inputs((a,), {"b": b}))
    torch.testing.assert_close(got, model(a, b))


def test_leaf_modules_stay_opaque() -> None:
    model, inputs = example("resnet")
    traced = pipec.trace(model, inputs, method="fx", leaf_modules=[type(model.blocks[0])])
    block_nodes = [n for n in traced.nodes if n.module_path.startswith("blocks.0")]
    assert [n.op for n in block_nodes] == ["call_module"]
    assert len(block_nodes[0].params) == 8


# -- bad input -------------------------------------------------------------------


def test_non_module_is_rejected() -> None:
    with pytest.raises(ConfigError, match="nn.Module"):
        pipec.trace(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


def test_inputs_that_do_not_match_forward() -> None:
    model, _ = example("two_input")
    with pytest.raises(TraceError, match="do not match") as info:
        pipec.trace(model, (torch.randn(2, 8),))
    assert isinstance(info.value, PipecError) and isinstance(info.value, ValueError)


def test_wrong_shapes_are_reported_before_tracing() -> None:
    model, _ = example("mlp")
    with pytest.raises(TraceError, match="example inputs"):
        pipec.trace(model, (torch.randn(2, 5),))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.sum() > 0:  # control flow on a tensor value: untraceable
            return h * 2
        return h


def test_untraceable_model_names_methods_and_fix() -> None:
    with pytest.raises(TraceError) as info:
        pipec.trace(DataDependent(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "fx" in msg and "export" in msg and "To fix" in msg


def test_unknown_method() -> None:
    model, inputs = example("mlp")
    with pytest.raises(ConfigError, match="method"):
        pipec.trace(model, inputs, method="jit")


class _OptionalArgs(nn.Module):
    """An HF-style forward: optional ``labels=None`` and flags the graph bakes in."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool = True,
                **kwargs: object) -> object:
        y = self.b(torch.relu(self.a(x)))
        if labels is not None:
            y = y + labels
        return {"y": y} if return_dict else (y,)


def test_fx_graph_asks_for_no_baked_optional_argument() -> None:
    # regression (#13, zoo): HF EfficientNet under fx kept `labels_1`, `return_dict_1` as
    # graph inputs, and every step failed with "missing input 'labels_1'"
    x = torch.randn(8, 4)
    traced = pipec.trace(_OptionalArgs(), (x,), method="fx")
    assert traced.input_names == ("x",)
    assert len(traced.flatten_inputs((x,), {"labels": None, "return_dict": True})) == 1
    with pytest.raises(pipec.PipecError, match="'labels' was traced with the value None"):
        traced.flatten_inputs((x,), {"labels": torch.ones(8, 4)})
    with pytest.raises(pipec.PipecError, match="'return_dict'"):
        traced.flatten_inputs((x,), {"return_dict": False})
