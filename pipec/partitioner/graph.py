"""Phase partition: from a traced graph to a chain problem, and from a split to plan data.

Input: a :class:`pipec.types.TracedGraph` and its per-node costs. Output: a
:class:`GraphChain` (the :class:`ChainProblem` plus the names behind its
positions), and -- once split -- a :class:`pipec.plan.PlanData`.

The value-flow graph is a ``networkx.DiGraph`` over the traced nodes. Compute
nodes are every node except ``placeholder``, ``get_attr`` and ``output``;
their topological order gives the chain positions. Graph inputs are on every
stage for free; ``get_attr`` nodes are copied into every stage that reads
them (so a parameter's users are the compute nodes that read it); the output
node belongs to the last stage (its reads count at position ``N - 1``).

A value can only cross a cut when it is one plain tensor: while an ``int``
(``x.size(0)``) or a tuple (before its ``getitem``) is live, the cut is
forbidden. A size of the model inputs' shapes (``NodeInfo.is_size``: the
``sym_size`` nodes of a dynamic ``torch.export`` graph, which every layer's
views read) is the exception: it is no chain position, and each stage that
reads it recomputes it (:mod:`pipec.split`), so it neither crosses nor pins a
cut, and what it reads is not kept live for it. Whether a value is a plain
tensor comes from ``node.meta["val"]`` (torch.export graphs) or else: exactly
one tensor leaf and not only read through ``getitem`` (fx graphs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import torch

from pipec.costs.node_exec import FREE_OPS
from pipec.costs.recompute import matmul_flags
from pipec.errors import PartitionError
from pipec.partitioner.problem import AllReduceTime, ChainProblem, ChainTensor, CommTime, ParamGroup
from pipec.types import NodeCost, NodeInfo, TracedGraph, boundary_meta

NOT_COMPUTE = FREE_OPS  # the ops that cost nothing are the ones that are not chain positions


@dataclass(frozen=True)
class GraphChain:
    """A chain problem and the graph names behind it."""

    problem: ChainProblem
    names: tuple[str, ...]  # compute node per position
    tensor_names: tuple[str, ...]  # producer node per chain tensor
    param_fqns: tuple[str, ...]  # canonical FQN per parameter group


def value_graph(traced: TracedGraph) -> nx.DiGraph:
    """``networkx`` graph of value flow: an edge ``a -> b`` when node ``b`` reads ``a``."""
    graph = nx.DiGraph()
    for position, info in enumerate(traced.nodes):
        graph.add_node(info.name, op=info.op, order=position)
    for info in traced.nodes:
        graph.add_edges_from((src, info.name) for src in info.inputs)
    if not nx.is_directed_acyclic_graph(graph):
        raise PartitionError(f"the traced graph of {traced.model_name} has a cycle; re-trace the model")
    return graph


def is_plain_tensor(info: NodeInfo, nodes: Mapping[str, torch.fx.Node]) -> bool:
    """Whether node ``info``'s value is a single tensor (so it may cross a cut).
    Recorded by the tracer from the value the node produced on the example."""
    del nodes  # kept for callers; the tracer's record is authoritative
    return info.is_tensor


def build_chain(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    *,
    num_stages: int,
    num_ranks: int | None = None,
    comm_time: CommTime | None = None,
    allreduce_time: AllReduceTime | None = None,
    device_speeds: Sequence[float] | None = None,
    memory_limit: Sequence[int | None] | None = None,
    schedule: str = "1f1b",
    num_microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    optimizer_state_bytes_per_param: int = 8,
    placement: Sequence[int] | None = None,
    precision: str = "fp32",
    recompute: Sequence[str] = ("none",),
    in_backward: Sequence[int] | None = None,
    held_grads: Sequence[int] | None = None,
) -> GraphChain:
    """The chain problem of ``traced`` (see the module docstring); ``recompute`` are the
    policies each stage may take (:mod:`pipec.costs.recompute`). Under ``precision``
    "bf16"/"fp16" a float tensor crossing a cut costs its compute-dtype bytes
    (:func:`pipec.types.boundary_meta`): the runtime sends it in that dtype."""
    graph = value_graph(traced)
    infos = {n.name: n for n in traced.nodes}
    names = compute_names(traced)
    if not names:
        raise PartitionError(f"{traced.model_name} has no compute nodes to place on stages")
    missing = [n for n in names if n not in node_costs]
    if missing:
        raise PartitionError(
            f"node_costs has no cost for {len(missing)} node(s) such as {missing[:3]}; "
            "cost the same traced graph (cost_model.node_costs(traced))"
        )
    pos = {name: i for i, name in enumerate(names)}
    last = len(names) - 1
    fx_nodes = {n.name: n for n in traced.graph_module.graph.nodes}

    def position(reader: str) -> int | None:
        op = graph.nodes[reader]["op"]
        return last if op == "output" else pos.get(reader)  # None for a size: each stage makes its own

    cuttable = [True] * (len(names) + 1)
    tensors: list[ChainTensor] = []
    tensor_names: list[str] = []
    for name in names:
        p = pos[name]
        readers = sorted({q for r in graph.successors(name) if (q := position(r)) is not None and q > p})
        if not readers:
            continue
        info = infos[name]
        if is_plain_tensor(info, fx_nodes):
            meta = boundary_meta(info.outputs[0], precision)
            tensors.append(ChainTensor(p, tuple(readers), meta.num_bytes, meta.is_floating))
            tensor_names.append(name)
        else:
            for c in range(p + 1, readers[-1] + 1):
                cuttable[c] = False
    groups, fqns = _param_groups(traced, graph, pos, last)
    problem = ChainProblem(
        compute_time=tuple(float(node_costs[n].total_time) for n in names),
        num_stages=num_stages,
        tensors=tuple(tensors),
        cuttable=tuple(cuttable),
        params=groups,
        saved_bytes=tuple(int(node_costs[n].saved_bytes) for n in names),
        comm_time=comm_time,
        allreduce_time=allreduce_time,
        num_ranks=num_ranks,
        device_speeds=None if device_speeds is None else tuple(float(s) for s in device_speeds),
        memory_limit=None if memory_limit is None else tuple(memory_limit),
        schedule=schedule,
        num_microbatches=num_microbatches,
        in_flight=None if in_flight is None else tuple(in_flight),
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
        placement=None if placement is None else tuple(placement),
        recompute=tuple(recompute),
        forward_time=tuple(float(node_costs[n].forward_time) for n in names),
        matmul=matmul_flags(traced, names),
        output_bytes=tuple(infos[n].output_bytes for n in names),
        in_backward=None if in_backward is None else tuple(in_backward),
        held_grads=None if held_grads is None else tuple(held_grads),
    )
    return GraphChain(problem, names, tuple(tensor_names), fqns)


def _param_groups(
    traced: TracedGraph, graph: nx.DiGraph, pos: Mapping[str, int], last: int
) -> tuple[tuple[ParamGroup, ...], tuple[str, ...]]:
    """One group per parameter/buffer read by the graph, with the positions of its readers."""
    readers: dict[str, set[int]] = {}
    for info in traced.nodes:
        for fqn in info.params:
            places = {pos[info.name]} if info.name in pos else set()
            if info.op == "get_attr":  # copied into each reader's stage
                places = {pos.get(r, last) for r in graph.successors(info.name)}
            readers.setdefault(fqn, set()).update(places)
    groups, fqns = [], []
    for fqn, param in traced.params.items():
        users = readers.get(fqn, set()) | {pos[u] for u in param.users if u in pos}
        if not users:
            continue
        groups.append(ParamGroup(param.num_bytes, param.numel, tuple(sorted(users)), param.is_buffer))
        fqns.append(fqn)
    return tuple(groups), tuple(fqns)


def compute_names(traced: TracedGraph) -> tuple[str, ...]:
    """The compute nodes of ``traced`` in topological order: the chain positions.

    Sizes of the inputs' shapes (``is_size``) are none: no stage owns them, each
    stage that reads one makes its own (so no stage can be made of them alone)."""
    return tuple(n.name for n in traced.nodes if n.op not in NOT_COMPUTE and not n.is_size)


Split = Sequence[Sequence[str]] | Sequence[int] | Sequence[str]


def split_to_cuts(names: Sequence[str], split: Split) -> tuple[int, ...]:
    """Cut positions (0 .. N) from a manual split.

    ``split`` is one of: a list of node-name lists, one per stage, in order
    (placeholders/get_attr/output may appear and are ignored); a list of the
    interior cut positions (``num_stages - 1`` ints); a list of node names
    each of which starts a new stage.
    """
    n = len(names)
    pos = {name: i for i, name in enumerate(names)}
    items: list[object] = list(split)
    ints = [x for x in items if isinstance(x, int) and not isinstance(x, bool)]
    if items and len(ints) == len(items):
        return (0, *ints, n)
    strs = [x for x in items if isinstance(x, str)]
    if items and len(strs) == len(items):
        unknown = [x for x in strs if x not in pos]
        if unknown:
            raise PartitionError(f"split: {unknown[:3]} are not compute nodes of the graph; "
                                 f"compute nodes are e.g. {list(names[:5])}")
        return (0, *(pos[x] for x in strs), n)
    lists = [x for x in items if isinstance(x, (list, tuple))]
    if len(lists) != len(items):
        raise PartitionError("split: expected a list of node-name lists (one per stage), a list of cut "
                             f"positions (ints) or a list of stage-starting node names; found {split!r:.200}")
    stages = [[x for x in stage if isinstance(x, str) and x in pos] for stage in lists]
    flat = [x for stage in stages for x in stage]
    if flat != list(names):
        listed = set(flat)
        absent = [x for x in names if x not in listed]
        raise PartitionError(
            "split: the stages' nodes must be every compute node once, contiguous in topological "
            f"order; missing {absent[:3]}" if absent else
            "split: the stages' nodes must be contiguous in the graph's topological order "
            "and each listed once; reorder them as traced.nodes lists them"
        )
    cuts = [0]
    for stage in stages:
        cuts.append(cuts[-1] + len(stage))
    return tuple(cuts)


__all__ = [
    "NOT_COMPUTE",
    "GraphChain",
    "Split",
    "build_chain",
    "compute_names",
    "is_plain_tensor",
    "split_to_cuts",
    "value_graph",
]
