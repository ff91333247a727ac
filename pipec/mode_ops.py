"""Which operations of a traced graph depend on train/eval mode, and which draw random numbers.

Phase: trace (facts about a graph's operations, no graph is changed here).
Used by split (:mod:`pipec.split.modes`, :mod:`pipec.split.randomness`) to make
stage modules follow ``train()``/``eval()`` and seed their random operations,
and by partition to name the BatchNorm layers whose statistics pipelining
changes.

A traced graph holds the mode as constants: ``torch.export`` records
``aten.dropout(x, 0.1, True)`` and ``aten.batch_norm(..., True, ...)`` for a
model in ``train()`` mode, fx records ``F.dropout(x, p=0.1, training=True)``.
The mode arguments are found by name in the operation's signature (its aten
schema, or the Python signature of a ``torch`` function), so every dropout,
batch-norm, instance-norm and rrelu variant is covered by the same rule:

- a bool argument named ``training``, ``train`` or ``use_input_stats`` is the mode;
- a float argument named ``dropout_p`` (scaled dot-product attention) is
  applied in training only, as ``nn.MultiheadAttention`` and HF models do.

Random operations are the aten operators tagged ``nondeterministic_seeded``,
found the same way for ``torch`` functions and tensor methods by their aten
name, plus the few ``torch.nn.functional`` ones with no aten twin.

Random operations with no mode argument (``torch.rand``, ``bernoulli``) draw
in both modes: :func:`mode_blind_random` finds them, so partition and
``eval()`` can say that Python skipping them in eval (stochastic depth) was
baked in when the model was traced in training mode.

Limits: both tracers record a default argument as given, so a dropout
called as ``F.dropout(x, 0.1)`` (on in eval too, eagerly) looks like one
called with ``training=self.training`` and is switched off by ``eval()``.
Mode arguments of user functions (fx ``wrap``) are left alone, and so is
Python control flow on ``self.training`` other than the value of these
arguments (it was decided when the graph was traced).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

#: bool arguments that carry the mode (dropout: ``train``/``training``; instance norm: ``use_input_stats``)
MODE_ARGS = ("training", "train", "use_input_stats")
#: float arguments used only in training (zero in eval)
TRAIN_ONLY_ARGS = ("dropout_p",)
#: ``torch.nn.functional`` random functions without an aten operator of the same name
_RANDOM_FUNCTIONS = frozenset({"dropout1d", "dropout2d", "dropout3d", "gumbel_softmax"})
_SEEDED = torch.Tag.nondeterministic_seeded


def _is_torch(target: Any) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith(("torch.", "torch._C"))


def _aten_packet(name: str) -> torch._ops.OpOverloadPacket | None:
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


@functools.lru_cache(maxsize=512)
def _names_of(target: Callable[..., Any]) -> tuple[str, ...] | None:
    if isinstance(target, torch._ops.OpOverload):
        return tuple(a.name for a in target._schema.arguments)
    if not _is_torch(target):
        return None  # a user function: its arguments mean what the user says
    try:
        params = inspect.signature(target).parameters.values()
        return tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    except (TypeError, ValueError):  # a builtin: read its aten schema
        packet = _aten_packet(getattr(target, "__name__", ""))
        default = getattr(packet, "default", None) if packet is not None else None
        if isinstance(default, torch._ops.OpOverload):
            return tuple(a.name for a in default._schema.arguments)
        return None


def argument_names(node: fx.Node) -> tuple[str, ...] | None:
    """The names of a ``call_function`` node's parameters in order, for ``torch``
    operations; None for anything else (user functions, methods, modules)."""
    if node.op != "call_function" or not callable(node.target):
        return None
    try:
        return _names_of(node.target)
    except TypeError:  # unhashable target
        return None


def argument(node: fx.Node, name: str) -> tuple[int | str, Any] | None:
    """Where ``name`` is given in ``node`` (a position or a keyword) and its value;
    None when the call leaves it to its default or the name is not a parameter."""
    names = argument_names(node)
    if names is None or name not in names:
        return None
    if name in node.kwargs:
        return name, node.kwargs[name]
    i = names.index(name)
    if i < len(node.args):
        return i, node.args[i]
    return None


@functools.lru_cache(maxsize=512)
def _packet_is_random(name: str) -> bool:
    packet = _aten_packet(name)
    if packet is None:
        return False
    overloads: list[str] = packet.overloads()  # type: ignore[no-untyped-call]
    return any(_SEEDED in getattr(packet, o).tags for o in overloads)


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws from the random number generator (dropout, ``rand``,
    ``bernoulli_``, attention with dropout, ...)."""
    if node.op == "call_method" and isinstance(node.target, str):
        return _packet_is_random(node.target)
    if node.op != "call_function" or not _is_torch(node.target):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return _SEEDED in node.target.tags
    name = getattr(node.target, "__name__", "")
    if name in _RANDOM_FUNCTIONS and getattr(node.target, "__module__", "") == "torch.nn.functional":
        return True
    return _packet_is_random(name)


def is_mode_blind_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers but has no mode argument to follow
    (``torch.rand``, ``bernoulli``, ``randn`` ...): it draws in ``eval()`` too.

    Python that skips such a node in eval (timm ``DropPath``, torchvision
    ``StochasticDepth``: ``if not self.training: return x``) was decided when
    the model was traced, so a graph traced in training mode keeps drawing.
    """
    if not is_random(node):
        return False
    names = argument_names(node) or ()
    return not any(name in names for name in (*MODE_ARGS, *TRAIN_ONLY_ARGS))


def mode_blind_random(graph_module: fx.GraphModule, module_paths: dict[str, str]) -> dict[str, str]:
    """The :func:`is_mode_blind_random` nodes of a traced graph: node name -> the
    module path that calls it ("" where unknown), in graph order.

    ``module_paths`` maps node names to their module path (``NodeInfo.module_path``).
    """
    return {node.name: module_paths.get(node.name) or "" for node in graph_module.graph.nodes
            if is_mode_blind_random(node)}


def describe_nodes(nodes: dict[str, str], limit: int = 8) -> str:
    """``"rand (dp), bernoulli (blocks.3.drop_path)"`` for messages."""
    shown = [f"{name} ({path})" if path else name for name, path in list(nodes.items())[:limit]]
    more = f" and {len(nodes) - limit} more" if len(nodes) > limit else ""
    return ", ".join(shown) + more


def is_batch_norm_op(node: fx.Node) -> bool:
    """A ``call_function`` of a batch-norm variant (``F.batch_norm``, ``aten.batch_norm``,
    ``aten._native_batch_norm_legit``, ...) -- by name, with a ``running_mean`` argument."""
    names = argument_names(node)
    name = getattr(node.target, "__name__", "") or str(node.target)
    return names is not None and "running_mean" in names and "batch_norm" in name


def batch_norm_layers(graph_module: fx.GraphModule, module_paths: dict[str, str]) -> tuple[str, ...]:
    """The BatchNorm layers of a traced graph that normalise by batch statistics
    (in training, or always when they track no running statistics), by module
    path (the node name where the path is unknown), in graph order.

    ``module_paths`` maps node names to their module path (``NodeInfo.module_path``).
    """
    found: dict[str, None] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(str(node.target))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    module.training or not module.track_running_stats):
                found[str(node.target)] = None
        elif node.op == "call_function" and is_batch_norm_op(node):
            mode = argument(node, "training")
            stats = argument(node, "running_mean")
            if (mode is not None and mode[1] is True) or (stats is not None and stats[1] is None):
                found[module_paths.get(node.name) or node.name] = None
    return tuple(found)


__all__ = [
    "MODE_ARGS",
    "TRAIN_ONLY_ARGS",
    "argument",
    "argument_names",
    "batch_norm_layers",
    "describe_nodes",
    "is_batch_norm_op",
    "is_mode_blind_random",
    "is_random",
    "mode_blind_random",
]
