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
arriving at each frontier node (a pre-hook). ``W`` then runs each frontier node
once more from that gradient and keeps only its *own* outputs along its edges
off the input side (a post-hook that also stops the propagation there): the
local vector-Jacobian product, the weight-gradient matmul. Summed per target
node, these seed one backward through the parameter-only subgraphs, together
with the stage outputs off the input side. Gradients are linear, so that is
the full weight gradient.

Why the post-hook and not the value autograd captures at the target edge: that
value sums every path from the frontier node to the target, and a target can be
reached again through the input side -- a ``Linear`` of a graph input whose
output is read at two places of the input side (``tanh(h * gate) + h``), a
parameter used twice along the input side (a shared layer), a target under
another target of the same node -- so the other frontier nodes' shares would
be counted twice. In such a shape the node also computes its outputs towards
the input side, which the post-hook drops; in any other (a chain of layers)
``W`` runs no input-side work at all. A stage with no boundary input leaves all
of its backward to ``W``; a root that is a leaf makes ``W`` fall back to a
second backward from the stage outputs restricted to the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

Grads = list[torch.Tensor | None]


@dataclass
class PendingWeightGrad:
    """What ``I`` leaves for ``W``: the roots, and the frontier's captured gradients."""

    tensors: list[torch.Tensor]
    grads: Grads
    # (frontier node, [(position in its next_functions, the edge there)]) per frontier node
    frontier: list[tuple[Node, list[tuple[int, GradientEdge]]]] = field(default_factory=list)
    captured: dict[Node, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    side_roots: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    reuse: bool = False


def full_backward(tensors: Sequence[torch.Tensor], grads: Grads) -> None:
    """B: gradients of every leaf (boundary inputs and parameters) at once."""
    if tensors:
        torch.autograd.backward(list(tensors), grad_tensors=list(grads))


def _children(node: Node) -> list[tuple[Node, int]]:
    return [(c, nr) for c, nr in node.next_functions if c is not None]


def _reaches(roots: Sequence[Node], targets: set[Node]) -> dict[Node, bool]:
    """For every node reachable from ``roots``: whether it reaches a node of ``targets``."""
    memo: dict[Node, bool] = {}
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if node in memo and not expanded:
            continue
        kids = [c for c, _ in _children(node)]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in kids if c not in memo)
            continue
        memo[node] = node in targets or any(memo.get(c, False) for c in kids)
    return memo


def input_backward(
    tensors: list[torch.Tensor], grads: Grads, leaves: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[Grads, PendingWeightGrad]:
    """I: the gradients of ``leaves`` (boundary inputs); keeps the graph for :func:`weight_backward`."""
    pending = PendingWeightGrad(tensors, grads)
    if not tensors or not leaves:
        return [None] * len(leaves), pending  # W will run the whole backward
    roots = [t.grad_fn for t in tensors]
    if any(r is None for r in roots) or not params:
        computed = torch.autograd.grad(tensors, list(leaves), grads, retain_graph=True, allow_unused=True)
        return list(computed), pending
    root_nodes = [r for r in roots if r is not None]
    input_side = _reaches(root_nodes, {get_gradient_edge(x).node for x in leaves})
    param_nodes = {get_gradient_edge(p).node for p in params}
    feeds_param = _reaches(root_nodes, param_nodes)
    frontier: list[tuple[Node, list[tuple[int, GradientEdge]]]] = []
    for node, on_input_side in input_side.items():
        if not on_input_side:
            continue
        edges = [
            (i, GradientEdge(c, nr))
            for i, (c, nr) in enumerate(node.next_functions)
            if c is not None and not input_side[c] and feeds_param[c]
        ]
        if edges:
            frontier.append((node, edges))
    pending.frontier = frontier
    pending.side_roots = [(t, g) for t, g, r in zip(tensors, grads, root_nodes) if not input_side[r]]
    pending.reuse = True

    def capture(node: Node) -> Any:
        def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            pending.captured[node] = grad_outputs

        return hook

    handles = [node.register_prehook(capture(node)) for node, _ in frontier]
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
    # 1. each frontier node's own outputs towards the parameters, from the gradient I saw arrive
    roots: dict[tuple[Node, int], torch.Tensor] = {}
    for node, edges in pending.frontier:
        arrived = pending.captured.get(node)
        if arrived is None:
            continue  # no gradient reached it: it contributes nothing
        outs = [GradientEdge(node, i) for i, g in enumerate(arrived) if g is not None]
        if not outs:
            continue
        for (_, e), v in zip(edges, _local_grads(node, edges, outs, [g for g in arrived if g is not None])):
            if v is not None:
                key = (e.node, e.output_nr)
                roots[key] = v if key not in roots else roots[key] + v
    # 2. one backward through the parameter-only subgraphs (and the roots off the input side)
    outputs = [GradientEdge(n, nr) for n, nr in roots]
    seeds = list(roots.values())
    for t, g in pending.side_roots:
        outputs.append(get_gradient_edge(t))
        seeds.append(g if g is not None else torch.ones_like(t))
    if outputs:
        torch.autograd.backward(outputs, grad_tensors=seeds, inputs=list(params))
    pending.captured.clear()


def _local_grads(
    node: Node, edges: Sequence[tuple[int, GradientEdge]], outs: list[GradientEdge], seeds: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """What ``node`` alone sends along ``edges`` when ``seeds`` arrive at ``outs``.

    A post-hook reads ``node``'s outputs and replaces them by None, so nothing
    propagates past it: the values autograd would capture at the edges add
    every other path from ``node`` to them (see the module docstring)."""
    local: list[torch.Tensor | None] = [None] * len(edges)

    def keep(grad_inputs: tuple[torch.Tensor | None, ...], _: tuple[torch.Tensor | None, ...]) -> Any:
        for k, (i, _e) in enumerate(edges):
            local[k] = grad_inputs[i]
        return tuple(None for _ in grad_inputs)

    targets = list({(e.node, e.output_nr): e for _, e in edges}.values())
    handle = node.register_hook(keep)
    try:
        torch.autograd.grad(outs, targets, seeds, retain_graph=True, allow_unused=True)
    finally:
        handle.remove()
    return local
