"""Capture by ``torch.fx`` symbolic tracing (phase 1, trace; see :mod:`pipec.tracing`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.errors import TraceError
from pipec.microbatch import check_constant, flatten_call
from pipec.tracing.capture import LeafSpec, _Capture
from pipec.types import InputStructure

# -- fx ------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[LeafSpec]) -> None:
        super().__init__()
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], leaves: Sequence[LeafSpec]) -> _Capture:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    # fx would bake the tensors inside a dict / list / tuple argument into the graph as
    # constants: the graph then ignores its inputs. torch.export takes such inputs apart.
    for name, value in bound.arguments.items():
        variadic_arg = sig.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if not variadic_arg and not isinstance(value, torch.Tensor) and any(
            isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)
        ):
            raise TraceError(
                f"input {name!r} is a {type(value).__name__} holding tensors, which fx would bake "
                "into the graph as constants; trace with method='export' (or the default 'auto')"
            )
    # Arguments that are not tensors (flags, None) are baked in as constants.
    concrete = {
        name: value
        for name, value in bound.arguments.items()
        if not isinstance(value, torch.Tensor)
        and sig.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # A ``*args`` / ``**kwargs`` of forward becomes a placeholder that a plain call
    # cannot fill positionally (HF models take ``**kwargs`` they pass down); one
    # no node reads is dropped, so the graph takes one value per named input.
    variadic = [n for n in gm.graph.nodes
                if n.op == "placeholder" and str(n.target).startswith("*") and not n.users]
    for node in variadic:
        gm.graph.erase_node(node)
    dropped = _drop_guarded_constants(gm.graph, concrete)
    if variadic or dropped:
        gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(n.target).lstrip("*") for n in placeholders]

    structure = _fx_structure(sig, placeholders, {n: concrete[n] for n in dropped})

    # baked-in values the structure cannot hold (not None/bool/int/float/str) are checked here
    unsaved = [n for n in dropped if structure is None or n not in structure.constants]

    def flatten(a: tuple[Any, ...], kw: Mapping[str, Any]) -> tuple[Any, ...]:
        # the binding a loaded plan uses too; the signature is bound again only when needed
        values = flatten_call(a, kw, structure, ()) if structure is not None else None
        if values is None or unsaved:
            b = sig.bind(*a, **kw)
            b.apply_defaults()
            for name in unsaved:
                check_constant(name, b.arguments.get(name), concrete[name])
            if values is None:
                values = tuple(b.arguments.get(name) for name in names)
        return values

    return _Capture(gm, "fx", flatten(args, kwargs), flatten, lambda out: out, structure)


def _fx_structure(
    sig: inspect.Signature, placeholders: Sequence[fx.Node], guarded: Mapping[str, Any]
) -> InputStructure | None:
    """How fx's graph binds a call: forward's parameters, one per graph input; None
    when a graph input is a ``*args`` / ``**kwargs`` pack (bound as a whole in memory)."""
    if any(str(n.target).startswith("*") for n in placeholders):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    simple = (type(None), bool, int, float, str)
    constants = {n: v for n, v in guarded.items() if type(v) in simple}
    explicit = []
    for name, value in constants.items():
        default = sig.parameters[name].default
        same = default is value if value is None or isinstance(value, bool) else (
            type(default) is type(value) and bool(default == value))
        if not same:
            explicit.append(name)
    return InputStructure(
        parameters=tuple(n for n, p in sig.parameters.items() if p.kind not in variadic),
        var_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()),
        arguments=tuple(str(n.target) for n in placeholders),
        constants=constants,
        explicit=tuple(explicit),
    )


def _drop_guarded_constants(graph: fx.Graph, concrete: Mapping[str, Any]) -> list[str]:
    """Remove the placeholders fx keeps for ``concrete_args`` (``labels_1`` for an
    HF ``labels=None``) when only their guards read them; return the argument names.

    fx bakes a concrete argument's value into the graph and keeps a placeholder
    whose only readers are a guard (``_assert_is_none``, or ``==`` and
    ``torch._assert``) checking the call passes the same value. Left in, the plan
    asks every caller for ``labels_1``, ``return_dict_1`` ... that the model
    never reads; the guard moves to ``flatten`` (:func:`pipec.microbatch.check_constant`) instead.
    """
    dropped = []
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        name = str(node.target)
        if not (name.endswith("_1") and name[:-2] in concrete):
            continue
        guard: list[fx.Node] = []
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user not in guard:
                    guard.append(user)
                    frontier.append(user)
        if any(u.op == "output" for u in guard) or any(
            user not in guard for g in guard for user in g.users
        ):
            continue  # the value flows into the computation: keep it an input
        order = {n: i for i, n in enumerate(graph.nodes)}
        for g in sorted(guard, key=order.__getitem__, reverse=True):
            graph.erase_node(g)
        graph.erase_node(node)
        dropped.append(name[:-2])
    return dropped
