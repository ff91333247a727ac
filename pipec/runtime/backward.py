"""A stage's backward, whole (B) or split into input gradients (I) and weight gradients (W).

Phase: stage runtime. The split is the one of zero-bubble pipeline parallelism
(Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2): ``I`` computes
only what the previous stage waits for, ``W`` the rest, later.

``W`` reuses ``I``'s autograd graph instead of running the backward again. In
the graph of a stage, call *input side* the nodes from which a boundary input
is reachable (``I`` runs exactly those) and *frontier* the input-side nodes
that also feed a parameter through a node off the input side (the
``AddmmBackward`` of a ``Linear``: one edge to the previous layer, one to its
weight; the ``MulBackward`` of ``linear(raw_input) * gate``: one edge to the
gate, one to the ``Linear`` of a graph input). ``I`` records the gradient
arriving at each frontier node (a pre-hook). ``W`` then runs, per frontier node,
one backward from that node and that gradient to the parameters its edges off
the input side reach, accumulating into ``.grad``; a post-hook drops the node's
outputs towards the input side, so only its *own* outputs along its edges off
the input side (the local vector-Jacobian product, the weight-gradient matmul)
go on through the parameter-only subgraph. The stage outputs off the input side
get one backward of their own. Gradients are linear, so the sum is the full
weight gradient. (One backward per frontier node, straight to the parameters,
costs what torch's ``stage_backward_weight`` costs; collecting each node's
outputs first and running a second backward from their sums costs one more
engine call per ``W``: 1.4x to 2x the CPU time of ``W`` on the residual MLP of
``benchmarks/schedules_vs_torch.py``.)

Why the post-hook and not the value autograd captures at the target edge: that
value sums every path from the frontier node to the target, and a target can be
reached again through the input side -- a ``Linear`` of a graph input whose
output is read at two places of the input side (``tanh(h * gate) + h``), a
parameter used twice along the input side (a shared layer), a target under
another target of the same node -- so the other frontier nodes' shares would
be counted twice. In such a shape the node also computes its outputs towards
the input side, which the post-hook drops (the input-side nodes below it then
see no gradient: built-in ones compute nothing, a custom ``autograd.Function``
runs on zeros); in any other (a chain of layers)
``W`` runs no input-side work at all. A stage with no boundary input leaves all
of its backward to ``W``; a root that is a leaf makes ``W`` fall back to a
second backward from the stage outputs restricted to the parameters.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

Grads = list[torch.Tensor | None]


@dataclass
class _Frontier:
    """A frontier node, which of its outputs (``next_functions`` positions) lead off the
    input side towards the parameters, and the parameters those reach."""

    node: Node
    keep: tuple[bool, ...]
    params: list[torch.Tensor]
    # whether a path from the node through the input side reaches those parameters too:
    # then W must drop the node's outputs towards the input side (``_cut``)
    cut: bool = True


@dataclass
class PendingWeightGrad:
    """What ``I`` leaves for ``W``: the roots, and the frontier's captured gradients."""

    tensors: list[torch.Tensor]
    grads: Grads
    frontier: list[_Frontier] = field(default_factory=list)
    captured: dict[Node, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    side_roots: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    reuse: bool = False


def full_backward(tensors: Sequence[torch.Tensor], grads: Grads) -> None:
    """B: gradients of every leaf (boundary inputs and parameters) at once."""
    if tensors:
        torch.autograd.backward(list(tensors), grad_tensors=list(grads))


_LEAF, _PARAM = 1, 2  # reach flags: the node reaches a boundary input / a parameter


def _reach(
    roots: Sequence[Node], leaves: Container[Node], params: Container[Node]
) -> tuple[dict[Node, int], dict[Node, list[Node | None]], dict[Node, int]]:
    """For every node reachable from ``roots``: which of ``leaves`` (``_LEAF``) and ``params``
    (``_PARAM``) it reaches, its children (``next_functions`` read once per node:
    each read builds Python tuples, and I runs this on every micro-batch), and how many
    edges lead to it."""
    flags: dict[Node, int] = {}
    kids: dict[Node, list[Node | None]] = {}
    parents: dict[Node, int] = {}
    stack = list(roots)
    while stack:
        node = stack[-1]
        if node in flags:
            stack.pop()
            continue
        ks = kids.get(node)
        if ks is None:  # first visit: children first
            ks = kids[node] = [c for c, _ in node.next_functions]
            todo = [c for c in ks if c is not None and c not in flags]
            if todo:
                stack.extend(todo)
                continue
        f = (_LEAF if node in leaves else 0) | (_PARAM if node in params else 0)
        for c in ks:
            if c is not None:
                f |= flags[c]
                parents[c] = parents.get(c, 0) + 1
        flags[node] = f
        stack.pop()
    return flags, kids, parents


def _reached_params(
    starts: Sequence[Node],
    kids: dict[Node, list[Node | None]],
    parents: Mapping[Node, int],
    param_of: Mapping[Node, torch.Tensor],
) -> tuple[list[torch.Tensor], bool]:
    """The parameters reachable from ``starts`` (a frontier node's children off the input
    side, each once per edge), in a fixed order; and whether any node below ``starts`` has
    a parent outside them, the frontier node and their descendants -- the only way a path
    from the frontier node through the input side can reach them (True: maybe)."""
    seen: set[Node] = set()
    found: list[torch.Tensor] = []
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        p = param_of.get(node)
        if p is not None:
            found.append(p)
        stack.extend(c for c in kids.get(node, ()) if c is not None and c not in seen)
    inner = len(starts) + sum(1 for n in seen for c in kids.get(n, ()) if c is not None and c in seen)
    return found, sum(parents.get(n, 0) for n in seen) != inner


def param_nodes(params: Sequence[torch.Tensor]) -> dict[Node, torch.Tensor]:
    """Each parameter's gradient accumulator node, to look up once per stage and pass to
    :func:`input_backward`: holding the node keeps it the one autograd uses for the
    parameter (it is created lazily and otherwise freed with the graph), and finding it
    costs a view per parameter."""
    return {get_gradient_edge(p).node: p for p in params}


def input_backward(
    tensors: list[torch.Tensor],
    grads: Grads,
    leaves: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    nodes: Mapping[Node, torch.Tensor] | None = None,
) -> tuple[Grads, PendingWeightGrad]:
    """I: the gradients of ``leaves`` (boundary inputs); keeps the graph for :func:`weight_backward`.
    ``nodes``: :func:`param_nodes` of ``params``, if the caller keeps them."""
    pending = PendingWeightGrad(tensors, grads)
    if not tensors or not leaves:
        return [None] * len(leaves), pending  # W will run the whole backward
    roots = [t.grad_fn for t in tensors]
    if any(r is None for r in roots) or not params:
        computed = torch.autograd.grad(tensors, list(leaves), grads, retain_graph=True, allow_unused=True)
        return list(computed), pending
    root_nodes = [r for r in roots if r is not None]
    param_of = nodes if nodes is not None else param_nodes(params)
    flags, kids, parents = _reach(root_nodes, {get_gradient_edge(x).node for x in leaves}, param_of)
    frontier: list[_Frontier] = []
    for node, f in flags.items():
        if not f & _LEAF:
            continue  # off the input side
        ks = kids[node]
        keep = tuple(c is not None and flags[c] == _PARAM for c in ks)
        if any(keep):
            starts = [c for c, k in zip(ks, keep) if k and c is not None]
            frontier.append(_Frontier(node, keep, *_reached_params(starts, kids, parents, param_of)))
    pending.frontier = frontier
    pending.side_roots = [(t, g) for t, g, r in zip(tensors, grads, root_nodes) if not flags[r] & _LEAF]
    pending.reuse = True

    def capture(node: Node) -> Any:
        def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            pending.captured[node] = grad_outputs

        return hook

    handles = [f.node.register_prehook(capture(f.node)) for f in frontier]
    try:
        computed = torch.autograd.grad(tensors, list(leaves), grads, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return list(computed), pending


def weight_backward(pending: PendingWeightGrad, params: Sequence[torch.Tensor]) -> None:
    """W: accumulate the parameter gradients into ``.grad``."""
    if not pending.tensors or not params:
        return
    if not pending.reuse:
        torch.autograd.backward(pending.tensors, grad_tensors=pending.grads, inputs=list(params))
        return
    # each frontier node once more from the gradient I saw arrive, on to the parameters its
    # own outputs off the input side reach: one backward per frontier node, accumulating
    # into .grad (gradients are linear, so the sum over frontier nodes is the whole)
    for f in pending.frontier:
        arrived = pending.captured.get(f.node)
        if arrived is None:
            continue  # no gradient reached it: it contributes nothing
        outs = [GradientEdge(f.node, i) for i, g in enumerate(arrived) if g is not None]
        if not outs or not f.params:
            continue
        # without a path through the input side to its parameters autograd does not compute
        # the node's outputs towards the input side, and there is nothing to cut
        handle = f.node.register_hook(_cut(f.keep)) if f.cut else None
        try:
            torch.autograd.backward(outs, grad_tensors=[g for g in arrived if g is not None], inputs=f.params,
                                    retain_graph=True)
        finally:
            if handle is not None:
                handle.remove()
    # the stage outputs off the input side: their whole backward (it reaches no boundary input)
    if pending.side_roots:
        torch.autograd.backward([t for t, _ in pending.side_roots],
                                grad_tensors=[g if g is not None else torch.ones_like(t) for t, g in pending.side_roots],
                                inputs=list(params))
    pending.captured.clear()


def _cut(keep: tuple[bool, ...]) -> Any:
    """A post-hook that drops a frontier node's outputs towards the input side, so its
    backward reaches the parameters through its own outputs off the input side only: a
    path back through the input side would add other frontier nodes' shares again (see
    the module docstring). Where no such path leads to the node's parameters autograd
    does not even compute those outputs."""

    def hook(grad_inputs: tuple[torch.Tensor | None, ...], _: tuple[torch.Tensor | None, ...]) -> Any:
        return tuple(g if k else None for g, k in zip(grad_inputs, keep))

    return hook
