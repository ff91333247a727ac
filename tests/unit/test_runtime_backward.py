"""The I/W split of a stage's backward (pipec/runtime/backward.py) equals autograd's backward.

For a stage's graph -- boundary inputs that require grad (the leaves ``I``
differentiates), graph inputs that do not, parameters -- ``input_backward``
must return exactly the leaves' gradients and ``weight_backward`` must then
accumulate exactly the parameters' gradients of one full backward. Named cases
cover the graph shapes that once broke (or could break) the frontier reuse;
a property test draws random stage graphs. float64, so "equal" is tight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from pipec.runtime.backward import full_backward, input_backward, weight_backward

D = 4
ROWS = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}


@dataclass
class Graph:
    """One stage's forward: ``build(leaves, raw, params)`` returns its outputs."""

    num_leaves: int
    num_raw: int
    params: list[torch.Tensor]
    build: Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


def _split_vs_full(g: Graph, seed: int, *, scalar_loss: bool = True) -> None:
    """Run ``g`` twice from the same values: once with B, once with I then W; compare."""
    gen = torch.Generator().manual_seed(seed)
    leaf_values = [torch.randn(ROWS, D, generator=gen, dtype=torch.float64) for _ in range(g.num_leaves)]
    raw = [torch.randn(ROWS, D, generator=gen, dtype=torch.float64) for _ in range(g.num_raw)]

    def forward() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        leaves = [v.clone().requires_grad_(True) for v in leaf_values]
        outs = [o for o in g.build(leaves, raw, g.params) if o.requires_grad]  # as the executor keeps them
        grads: list[torch.Tensor | None] = [
            torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + i), dtype=o.dtype)
            for i, o in enumerate(outs)
        ]
        if scalar_loss and outs:  # the last stage's scaled loss has no incoming gradient
            outs.append(torch.stack([(o**2).mean() for o in outs]).sum())
            grads.append(None)
        return leaves, outs, grads

    for p in g.params:
        p.grad = None
    leaves, outs, grads = forward()
    full_backward(outs, grads)
    want_inputs = [x.grad for x in leaves]
    want_params = [None if p.grad is None else p.grad.clone() for p in g.params]

    for p in g.params:
        p.grad = None
    leaves, outs, grads = forward()
    got_inputs, pending = input_backward(outs, grads, leaves, g.params)
    assert all(p.grad is None for p in g.params)  # I touches no parameter; W does it all
    weight_backward(pending, g.params)
    assert all(x.grad is None for x in leaves)  # I returns them; nothing accumulates into leaves

    for i, (want, got) in enumerate(zip(want_inputs, got_inputs)):
        if want is None:
            assert got is None or not got.any(), f"leaf {i}: no gradient expected"
        else:
            assert got is not None, f"leaf {i}: gradient missing"
            torch.testing.assert_close(got, want, **TOL)
    for i, (want, p) in enumerate(zip(want_params, g.params)):
        if want is None:
            assert p.grad is None or not p.grad.any(), f"param {i}: no gradient expected"
        else:
            assert p.grad is not None, f"param {i}: gradient missing"
            torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m, i=i: f"param {i}: {m}")


def _params(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` weight matrices then ``n`` bias vectors: ``p[k]`` and ``p[n + k]``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(D, D)] * n + [(D,)] * n
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]


# -- named graph shapes ------------------------------------------------------
# Each takes (leaves, raw inputs, params) and returns the stage outputs.
Build = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]

def _gated_residual(x: list[torch.Tensor], r: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
    h = F.linear(r[0], p[0], p[2])  # a Linear of a graph input: off the input side
    return [F.linear(torch.tanh(h * torch.sigmoid(x[0])) + h, p[1], p[3])]


def _shared_layer(x: list[torch.Tensor], r: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
    h = F.linear(x[0], p[0], p[2])
    return [F.linear(torch.tanh(F.linear(h, p[1])), p[0], p[2])]


def _param_only_bias(x: list[torch.Tensor], r: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
    bias = torch.tanh(p[0].sum(0))  # computed from parameters alone, read at every layer
    return [torch.tanh(torch.tanh(x[0] + bias) @ p[1] + bias) + bias]


# name -> (leaves, graph inputs, parameter pairs, build): build(leaves, graph inputs, params)
NAMED: dict[str, tuple[int, int, int, Build]] = {
    # issue #13: a Linear of a graph input whose output is read at two places of the input
    # side (times the gate from the previous stage, and a residual)
    "linear_of_raw_input_read_twice": (1, 1, 2, _gated_residual),
    # one Linear applied twice along the input side (a shared layer): both AddmmBackward
    # nodes have an edge straight to the bias's AccumulateGrad
    "parameter_used_twice_along_input_side": (1, 0, 2, _shared_layer),
    # a matmul with the parameter itself (no TBackward in between), twice
    "direct_param_matmul_twice": (1, 0, 1, lambda x, r, p: [torch.tanh(x[0] @ p[0]) @ p[0]]),
    # one node with two edges off the input side, one target below the other
    "nested_targets_of_one_node": (1, 0, 1, lambda x, r, p: [torch.addmm(p[0].sum(0), x[0], p[0])]),
    # a value of parameters alone read at several input-side places (a T5-style position bias)
    "param_only_value_read_everywhere": (1, 0, 2, _param_only_bias),
    # an output that no boundary input reaches (its gradient goes to W alone)
    "output_independent_of_boundary": (1, 1, 2, lambda x, r, p: [
        F.linear(x[0], p[0]), torch.tanh(F.linear(r[0], p[1], p[3])),
    ]),
    # one parameter both on the input side and off it
    "parameter_on_and_off_input_side": (1, 1, 1, lambda x, r, p: [
        F.linear(x[0], p[0], p[1]) * F.linear(r[0], p[0], p[1]),
    ]),
    # a stage with no boundary input that requires grad (only graph inputs and parameters)
    "no_boundary_input": (0, 2, 2, lambda x, r, p: [
        F.linear(torch.tanh(F.linear(r[0], p[0], p[2])) * r[1], p[1]),
    ]),
    # an output that is a boundary input itself (a root that is a leaf)
    "output_is_a_boundary_input": (2, 0, 1, lambda x, r, p: [x[1], F.linear(x[0], p[0], p[1])]),
    # two boundary inputs meeting a parameter at several depths
    "two_leaves_shared_weight": (2, 1, 2, lambda x, r, p: [
        F.linear(x[0] * x[1], p[0], p[2]) + F.linear(torch.tanh(F.linear(x[1], p[0], p[2])) + r[0], p[1]),
    ]),
}


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("scalar_loss", [False, True])
def test_named_graph_shapes(name: str, scalar_loss: bool) -> None:
    leaves, raw, nparams, build = NAMED[name]
    _split_vs_full(Graph(leaves, raw, _params(nparams), build), seed=1, scalar_loss=scalar_loss)


def test_micro_batches_interleaved_i_before_w() -> None:
    """Two micro-batches through the same parameters, I0 I1 W1 W0 (as ZB-H1 orders them):
    each W adds its own share, the sum is that of two full backwards."""
    params = _params(2)[:2]
    raw = [torch.randn(ROWS, D, dtype=torch.float64) for _ in range(2)]
    gates = [torch.randn(ROWS, D, dtype=torch.float64) for _ in range(2)]

    def stage(m: int, gate: torch.Tensor) -> torch.Tensor:
        h = F.linear(raw[m], params[0])
        return (F.linear(torch.tanh(h * gate) + h, params[1]) ** 2).mean()

    for p in params:
        p.grad = None
    for m in range(2):
        full_backward([stage(m, gates[m].clone().requires_grad_(True))], [None])
    want = [p.grad.clone() for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    pending = []
    for m in range(2):
        leaf = gates[m].clone().requires_grad_(True)
        pending.append(input_backward([stage(m, leaf)], [None], [leaf], params)[1])
    for m in (1, 0):
        weight_backward(pending[m], params)
    for w, p in zip(want, params):
        torch.testing.assert_close(p.grad, w, **TOL)


class _Counted(torch.autograd.Function):
    """Identity whose backward counts its calls."""

    calls = 0

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        _Counted.calls += 1
        return g


def test_w_does_not_rerun_the_input_side_of_a_chain() -> None:
    """In a chain of Linears W runs only the weight-gradient products: the input-side
    backward (what I already did) is not run again."""
    params = _params(3)[:3]
    leaf = torch.randn(ROWS, D, dtype=torch.float64, requires_grad=True)
    h = leaf
    for p in params:
        h = torch.tanh(F.linear(_Counted.apply(h), p))
    _Counted.calls = 0
    grads, pending = input_backward([h], [torch.ones_like(h)], [leaf], params)
    assert _Counted.calls == 3 and pending.reuse
    weight_backward(pending, params)
    assert _Counted.calls == 3
    assert all(p.grad is not None for p in params)


def test_w_cuts_the_input_side_only_where_a_path_through_it_reaches_the_parameters() -> None:
    """W drops a frontier node's outputs towards the input side (a post-hook per node and
    backward) only where a path through the input side leads to the node's parameters:
    never in a chain of Linears; at the residual read of ``h`` in ``tanh(h * gate) + h``,
    whose input-side branch reaches ``h``'s Linear again."""
    params = _params(3)[:3]
    leaf = torch.randn(ROWS, D, dtype=torch.float64, requires_grad=True)
    h = leaf
    for p in params:
        h = torch.tanh(F.linear(h, p))
    _, pending = input_backward([h], [torch.ones_like(h)], [leaf], params)
    assert len(pending.frontier) == 3 and not any(f.cut for f in pending.frontier)

    p = _params(2)
    gate = torch.randn(ROWS, D, dtype=torch.float64, requires_grad=True)
    out = _gated_residual([gate], [torch.randn(ROWS, D, dtype=torch.float64)], p)[0]
    _, pending = input_backward([out], [torch.ones_like(out)], [gate], p)
    assert any(f.cut for f in pending.frontier) and not all(f.cut for f in pending.frontier)


# -- random stage graphs -------------------------------------------------------
OPS = ("linear", "mm_param", "scale", "mul", "add", "tanh", "param_bias", "addmm_nested")


@st.composite
def stage_graphs(draw: st.DrawFn) -> tuple[Graph, int, bool]:
    """A random stage: leaves (require grad), graph inputs (do not), parameters drawn with
    replacement by each op (so some are used twice, on and off the input side), values
    read by any later op, a few outputs (which may not depend on any leaf, or be a leaf)."""
    num_leaves = draw(st.integers(0, 3))
    num_raw = draw(st.integers(0 if num_leaves else 1, 2))
    num_params = draw(st.integers(1, 3))
    ops = []
    for i in range(draw(st.integers(1, 8))):
        n = num_leaves + num_raw + i
        ops.append((draw(st.sampled_from(OPS)), draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1)),
                    draw(st.integers(0, num_params - 1))))
    total = num_leaves + num_raw + len(ops)
    outputs = draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=3, unique=True))
    if total - 1 not in outputs:
        outputs.append(total - 1)

    def build(x: list[torch.Tensor], r: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
        vals = [*x, *r]
        for kind, a, b, k in ops:
            u, v, w = vals[a], vals[b], p[k]
            if kind == "linear":
                vals.append(F.linear(u, w, p[num_params + k]))
            elif kind == "mm_param":
                vals.append(u @ w)
            elif kind == "scale":
                vals.append(u * p[num_params + k])
            elif kind == "mul":
                vals.append(u * v)
            elif kind == "add":
                vals.append(u + v)
            elif kind == "tanh":
                vals.append(torch.tanh(u))
            elif kind == "param_bias":
                vals.append(u + torch.tanh(w.sum(0)))
            else:
                vals.append(torch.addmm(w.sum(0), u, w))
        return [vals[i] for i in outputs]

    return Graph(num_leaves, num_raw, _params(num_params, seed=draw(st.integers(0, 9))), build), \
        draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(stage_graphs())
def test_random_stage_graphs(case: tuple[Graph, int, bool]) -> None:
    g, seed, scalar_loss = case
    _split_vs_full(g, seed, scalar_loss=scalar_loss)


def test_nothing_to_differentiate_leaves_grads_alone() -> None:
    params = _params(1)
    grads, pending = input_backward([], [], [], params)
    assert grads == []
    weight_backward(pending, params)
    assert params[0].grad is None
