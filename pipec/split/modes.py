"""Stage graphs that follow ``train()``/``eval()``, and whose random nodes are seeded.

Phase: split. Input: a stage's ``fx.Graph`` as copied from the traced graph
(mode constants baked in, see :mod:`pipec.mode_ops`), the mode the model was
traced in, and each node's name in the whole traced graph. Output: the same
graph, changed in place:

- every mode argument equal to the traced mode (``aten.dropout(x, p, True)``,
  ``batch_norm(..., training=True, ...)``) reads ``self.training`` of the
  stage module instead; an argument that differs from it belongs to a module
  whose mode differed from the model's at trace time (a frozen BatchNorm in a
  training model) and stays as it was. A batch norm without running
  statistics always uses batch statistics and is left alone;
- ``dropout_p`` of attention becomes ``train_only(p, training)``;
- the BatchNorm batch counter (``num_batches_tracked.add_(1)``) counts only in
  training (:func:`count_batch`); a graph traced in eval mode gets the counter
  it lacks;
- every random node calls :func:`pipec.split.randomness.seeded` with its name.

``stage.train()`` / ``stage.eval()`` then behave as on the original model,
in memory and in generated ``stage_<k>.py`` files alike. A graph traced in
eval mode cannot know what Python skipped there (attention dropout written as
``p if self.training else 0``): its stages start in eval mode and warn when
switched to training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch.fx.node import _get_qualified_name, has_side_effect

from pipec.mode_ops import (
    MODE_ARGS,
    TRAIN_ONLY_ARGS,
    argument,
    argument_names,
    is_batch_norm_op,
    is_random,
)
from pipec.split.randomness import _resolve, seeded
from pipec.split.stage import MODE_ATTR

log = logging.getLogger(__name__)

_COUNTER = "num_batches_tracked"


def train_only(value: float, training: bool) -> float:
    """``value`` in training, 0 in eval (attention dropout)."""
    return value if training else 0.0


@has_side_effect  # kept by dead-code elimination although nothing reads its result
def count_batch(counter: torch.Tensor, training: bool) -> torch.Tensor:
    """Count one batch into a BatchNorm's ``num_batches_tracked``, in training only."""
    if training:
        counter.add_(1)
    return counter


def follow_mode(
    graph: fx.Graph, *, traced_training: bool, buffer: Callable[[str], fx.Node | None]
) -> bool:
    """Make ``graph``'s mode-dependent nodes read :data:`MODE_ATTR`; whether any does.

    ``buffer(fqn)`` returns a ``get_attr`` node of the stage's tensor ``fqn``
    (adding it to the stage), or None when the model has no such tensor.
    """
    mode: list[fx.Node] = []

    def flag() -> fx.Node:
        if not mode:
            first = next((n for n in graph.nodes if n.op != "placeholder"), None)
            with graph.inserting_before(first) if first is not None else graph.inserting_after():
                mode.append(graph.get_attr(MODE_ATTR))
        return mode[0]

    counted = {str(n.args[0].target) for n in graph.nodes if _is_counter_update(n)}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is count_batch:
            continue
        if _is_counter_update(node):
            if traced_training:
                node.op, node.target, node.args, node.kwargs = "call_function", count_batch, (node.args[0], flag()), {}
            continue
        if node.op != "call_function":
            continue
        stats = argument(node, "running_mean")
        if stats is not None and stats[1] is None:
            continue  # no running statistics: batch statistics in both modes
        followed = False
        for name in MODE_ARGS:
            found = argument(node, name)
            if found is not None and isinstance(found[1], bool) and found[1] == traced_training:
                _set(node, found[0], flag())
                followed = True
        for name in TRAIN_ONLY_ARGS:
            found = argument(node, name)
            if traced_training and found is not None and isinstance(found[1], (int, float)) and found[1]:
                with graph.inserting_before(node):
                    _set(node, found[0], graph.call_function(train_only, (found[1], flag())))
        if followed and not traced_training and is_batch_norm_op(node) and stats is not None:
            _add_counter(graph, node, stats[1], counted, buffer, flag)
    return bool(mode)


def _is_counter_update(node: fx.Node) -> bool:
    """``num_batches_tracked.add_(1)`` as export (``aten.add_.Tensor``) or fx (``add_``) records it."""
    if node.op == "call_function" and node.target is torch.ops.aten.add_.Tensor:
        pass
    elif not (node.op == "call_method" and node.target == "add_"):
        return False
    first = node.args[0] if node.args else None
    return (isinstance(first, fx.Node) and first.op == "get_attr"
            and str(first.target).rpartition(".")[2] == _COUNTER and node.args[1:2] == (1,))


def _add_counter(
    graph: fx.Graph, node: fx.Node, running_mean: Any, counted: set[str],
    buffer: Callable[[str], fx.Node | None], flag: Callable[[], fx.Node],
) -> None:
    """Give a batch norm traced in eval mode the batch counter its training mode has."""
    if not (isinstance(running_mean, fx.Node) and running_mean.op == "get_attr"):
        return
    owner = str(running_mean.target).rpartition(".")[0]
    fqn = f"{owner}.{_COUNTER}" if owner else _COUNTER
    if fqn in counted:
        return
    with graph.inserting_before(node):
        counter = buffer(fqn)
        if counter is not None:
            counted.add(fqn)
            graph.call_function(count_batch, (counter, flag()))


def _set(node: fx.Node, where: int | str, value: Any) -> None:
    if isinstance(where, str):
        node.kwargs = {**node.kwargs, where: value}
    else:
        args = list(node.args)
        args[where] = value
        node.args = tuple(args)


def seed_random_nodes(graph: fx.Graph, names: Mapping[fx.Node, str]) -> list[str]:
    """Wrap every random node of ``graph`` in :func:`seeded` under its traced-graph
    name (``names``, else its own); returns the names wrapped."""
    wrapped: list[str] = []
    for node in list(graph.nodes):
        if not is_random(node) or _no_dropout(node):
            continue
        op = _op_reference(node)
        if op is None:
            log.info("random node %s (%s) cannot be named in a stage file; it is not seeded", node.name, node.target)
            continue
        name = names.get(node, node.name)
        node.op, node.target, node.args = "call_function", seeded, (name, op, *node.args)
        wrapped.append(name)
    return wrapped


def _no_dropout(node: fx.Node) -> bool:
    """Dropout or attention whose probability (``p``, ``dropout_p``) is absent or a
    constant 0 draws nothing (HF configs often set dropout to 0)."""
    names = argument_names(node) or ()
    for name in ("p", *TRAIN_ONLY_ARGS):
        if name in names:
            found = argument(node, name)
            if found is None:
                return name in TRAIN_ONLY_ARGS  # attention's default is no dropout
            return isinstance(found[1], (int, float)) and not found[1]
    return False


def _op_reference(node: fx.Node) -> Any:
    """What :func:`seeded` is given for the op: the aten operator itself (stage files
    print it as ``torch.ops.aten....``), or the qualified name of a function or method."""
    if node.op == "call_method":
        return f"torch.Tensor.{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target
    try:
        qualified = _get_qualified_name(node.target)  # type: ignore[arg-type]
        if _resolve(qualified) is node.target:
            return qualified
    except Exception:  # noqa: S110  not importable by name: left unseeded
        pass
    return None


__all__ = ["MODE_ATTR", "count_batch", "follow_mode", "seed_random_nodes", "train_only"]
