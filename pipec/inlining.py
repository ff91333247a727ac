"""Inlining a ``call_module`` node: the module as a flat graph of plain operations.

Phase: trace (used by split). An fx graph keeps ``torch.nn`` modules (and any
``leaf_modules``) as opaque ``call_module`` nodes. A stage written as code
(``stage_<k>.py``) must call plain operations only, so split inlines each
such node with :func:`inline_module`. Tracing asks the same question first
(:func:`opaque_modules`): with ``method="auto"``, an fx graph with a module
that cannot be inlined is not kept -- its plan could not be saved -- and
torch.export is tried instead.

Input: the module, its ``call_module`` node and the annotated
:class:`~pipec.types.TracedGraph` (for the recorded input shapes). Output: a
flat ``fx.GraphModule``, the value for each of its placeholders, and the
function that rebuilds the module's output from the graph's output -- or None.
The answer is kept in ``node.meta`` so the split reuses what tracing computed
(a torch.export of a small module takes tens of milliseconds).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.types import TracedGraph

log = logging.getLogger(__name__)

#: a module's flat graph, the value of each of its placeholders, and its output's rebuilder
Inlined = tuple[fx.GraphModule, list[Any], Callable[[Any], Any]]

_META_KEY = "pipec_inlined"


class _FlatTracer(fx.Tracer):
    """Traces through every module, so a stage graph has no ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def inline_module(module: nn.Module, node: fx.Node, traced: TracedGraph) -> Inlined | None:
    """``module`` (the target of ``node``) as a flat graph; None when neither fx nor
    torch.export can trace through it.

    fx first (keeps ``torch.nn.functional`` calls readable); ``torch.export``
    on inputs of the recorded shapes when fx meets data-dependent control flow
    (e.g. ``BatchNorm``'s input check).
    """
    if _META_KEY in node.meta:
        cached: Inlined | None = node.meta[_META_KEY]
        return cached
    result = _inline(module, node, traced)
    node.meta[_META_KEY] = result
    return result


def opaque_modules(traced: TracedGraph) -> list[str]:
    """The ``call_module`` targets of ``traced`` that cannot be inlined (in graph order)."""
    gm = traced.graph_module
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and inline_module(gm.get_submodule(str(n.target)), n, traced) is None]


def _inline(module: nn.Module, node: fx.Node, traced: TracedGraph) -> Inlined | None:
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
        if any(isinstance(x, fx.Node) for v in concrete.values() for x in pytree.tree_leaves(v)):
            return None
        graph = _FlatTracer().trace(module, concrete_args=concrete or None)
        sub = fx.GraphModule(module, graph)
        names = [str(n.target).lstrip("*") for n in graph.nodes if n.op == "placeholder"]
        return sub, [bound.arguments.get(n) for n in names], _same
    except Exception as exc:
        log.debug("fx cannot trace through %s: %s", node.target, exc)
    if node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    try:
        samples = tuple(_sample(traced, a.name) for a in node.args if isinstance(a, fx.Node))
        exported = torch.export.export(module, samples, strict=False).module()
        out_spec = getattr(exported, "_out_spec", None)
        if not isinstance(exported, fx.GraphModule) or not isinstance(out_spec, pytree.TreeSpec):
            return None
        if sum(1 for n in exported.graph.nodes if n.op == "placeholder") != len(samples):
            return None
        spec: pytree.TreeSpec = out_spec
        return exported, list(node.args), lambda flat: pytree.tree_unflatten(list(flat), spec)
    except Exception as exc:
        log.debug("torch.export cannot trace through %s: %s", node.target, exc)
        return None


def _same(value: Any) -> Any:
    return value


def _sample(traced: TracedGraph, name: str) -> torch.Tensor:
    meta = traced.node(name).outputs[0]
    if meta.is_floating:  # a private generator: the user's RNG state is theirs
        return torch.randn(meta.shape, dtype=meta.torch_dtype, generator=torch.Generator().manual_seed(0))
    return torch.zeros(meta.shape, dtype=meta.torch_dtype)


__all__ = ["Inlined", "inline_module", "opaque_modules"]
