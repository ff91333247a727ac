"""Finding mode arguments and random operations in graphs; seeding random nodes."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import fx
from torch.nn import functional as F

from pipec.mode_ops import argument, is_random
from pipec.split.randomness import RandomScope, node_seed, random_scope, seeded


def _nodes(fn: object) -> dict[str, fx.Node]:
    gm = fx.symbolic_trace(fn)  # type: ignore[arg-type]
    return {n.name: n for n in gm.graph.nodes}


def _ops(x: torch.Tensor) -> torch.Tensor:
    a = F.dropout2d(x, 0.5)
    b = torch.rand_like(a)
    c = b.bernoulli_(0.5)
    d = F.gumbel_softmax(c)
    e = torch.relu(d)
    f = F.scaled_dot_product_attention(e, e, e, dropout_p=0.1)
    g = F.layer_norm(f, (4,))
    return F.dropout(g, p=0.1, training=True)


def test_random_operations_are_found_by_their_aten_tag() -> None:
    nodes = _nodes(_ops)
    random = {n for n, node in nodes.items() if is_random(node)}
    assert random == {"dropout2d", "rand_like", "bernoulli_", "gumbel_softmax", "scaled_dot_product_attention",
                      "dropout"}
    dropout = torch.ops.aten.dropout.default
    g = fx.Graph()
    x = g.placeholder("x")
    assert is_random(g.call_function(dropout, (x, 0.1, True)))
    assert not is_random(g.call_function(torch.ops.aten.relu.default, (x,)))


def test_mode_arguments_are_found_by_name_positional_or_keyword() -> None:
    nodes = _nodes(_ops)
    assert argument(nodes["dropout"], "training") == ("training", True)
    assert argument(nodes["dropout2d"], "training") == ("training", True)  # torch records the default
    assert argument(nodes["relu"], "training") is None
    assert argument(nodes["scaled_dot_product_attention"], "dropout_p") == ("dropout_p", 0.1)
    g = fx.Graph()
    x = g.placeholder("x")
    bn = g.call_function(torch.ops.aten.batch_norm.default, (x, None, None, None, None, True, 0.1, 1e-5, False))
    assert argument(bn, "training") == (5, True)
    assert argument(bn, "running_mean") == (3, None)


def test_node_seed_is_the_same_in_every_process() -> None:
    scope = RandomScope(seed=7, step=3, microbatch=2)
    here = node_seed(scope, "blocks/dropout")
    code = ("from pipec.split.randomness import RandomScope, node_seed; "
            "print(node_seed(RandomScope(7, 3, 2), 'blocks/dropout'))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(there.stdout) == here
    others = {node_seed(RandomScope(7, 4, 2), "blocks/dropout"), node_seed(RandomScope(7, 3, 1), "blocks/dropout"),
              node_seed(RandomScope(8, 3, 2), "blocks/dropout"), node_seed(scope, "blocks/dropout_1")}
    assert here not in others and len(others) == 4


def test_seeded_draws_per_scope_and_leaves_the_global_generator_alone() -> None:
    x = torch.ones(64)
    dropout = torch.ops.aten.dropout.default
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    with random_scope(1, 0, 0):
        first = seeded("d", dropout, x, 0.5, True)
        again = seeded("d", dropout, x, 0.5, True)
        other_node = seeded("e", dropout, x, 0.5, True)
    with random_scope(1, 0, 1):
        other_microbatch = seeded("d", dropout, x, 0.5, True)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_node) and not torch.equal(first, other_microbatch)
    by_name = seeded("d", "torch.nn.functional.dropout", x, 0.5, True)  # outside a scope: global generator
    torch.manual_seed(0)
    torch.rand(3)
    assert torch.equal(by_name, F.dropout(x, 0.5, True))
