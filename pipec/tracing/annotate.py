"""Annotate a captured graph: per-node tensor metas, module paths, parameters by FQN
(phase 1, trace; see :mod:`pipec.tracing`). Output: :class:`pipec.types.TracedGraph`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.tracing.capture import _Capture, _check_output, _plain
from pipec.types import NodeInfo, ParamInfo, TensorMeta, TracedGraph

# -- annotation ------------------------------------------------------------------------


#: per node name: the TensorMeta of each tensor in its value, and whether the value is one tensor
_Values = tuple[dict[str, tuple[TensorMeta, ...]], dict[str, bool]]


def _metas_of(value: Any) -> tuple[TensorMeta, ...]:
    leaves = pytree.tree_leaves(_plain(value))
    return tuple(TensorMeta.of(x) for x in leaves if isinstance(x, torch.Tensor))


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps the TensorMeta of every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.metas: dict[str, tuple[TensorMeta, ...]] = {}
        self.is_tensor: dict[str, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.metas[n.name] = _metas_of(value)
        self.is_tensor[n.name] = isinstance(value, torch.Tensor)
        return value


def _run_recording(capture: _Capture) -> tuple[_Values, Any]:
    """One interpreter run on the example inputs: every node's metas, and the graph's output."""
    recorder = _Recorder(capture.gm)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        output = recorder.run(*capture.flat_inputs)
    return (recorder.metas, recorder.is_tensor), output


def _recorded_values(gm: fx.GraphModule) -> _Values | None:
    """The metas torch.export left in ``node.meta["val"]`` (fake tensors), without running
    anything; None when a node has no value recorded or a size has no example value.

    A symbolic size (a dynamic export) counts at the example's value (its hint):
    costs and memory are those of the example's shapes."""
    vals: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            vals[node.name] = fx.node.map_arg(node.args[0], lambda n: vals[n.name])
        elif "val" in node.meta:
            vals[node.name] = node.meta["val"]
        else:
            return None
    metas: dict[str, tuple[TensorMeta, ...]] = {}
    is_tensor: dict[str, bool] = {}
    for name, value in vals.items():
        leaves = pytree.tree_leaves(_plain(value))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        shapes = [[_example_size(d) for d in x.shape] for x in tensors]
        if any(None in shape for shape in shapes):
            return None  # a data-dependent size: no example value without running the graph
        metas[name] = tuple(
            TensorMeta(shape=tuple(int(d or 0) for d in shape), dtype=str(x.dtype).removeprefix("torch."),
                       num_bytes=math.prod(int(d or 0) for d in shape) * x.element_size())
            for x, shape in zip(tensors, shapes))
        is_tensor[name] = isinstance(value, torch.Tensor)
    return metas, is_tensor


def _example_size(size: int | torch.SymInt) -> int | None:
    """A size at the example's value: an int as is, a symbolic one by its hint (None if it has none)."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return None if hint is None else int(hint)


def _size_nodes(gm: fx.GraphModule) -> set[str]:
    """The nodes whose value is a size computed from the model inputs' shapes alone.

    Such a value is a ``SymInt`` (``SymBool``, ``SymFloat``) of a dynamic
    export: a ``sym_size`` whose size is one of the inputs' symbolic dims, or
    arithmetic / comparisons on such values. Any stage can recompute it from
    a tensor it holds with that dim (:mod:`pipec.split.graph`), so it never
    crosses a cut. A size of an intermediate tensor that is not an input's dim
    (``s0 * s1``) is not one: where it is read, it pins the cut as before.
    """
    input_symbols = {d.node.expr for n in gm.graph.nodes if n.op == "placeholder"
                     for d in getattr(n.meta.get("val"), "shape", ()) if isinstance(d, torch.SymInt)}
    sizes: set[str] = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            continue
        if node.target is torch.ops.aten.sym_size.int:
            if val.node.expr in input_symbols:
                sizes.add(node.name)
        elif node.all_input_nodes and all(i.name in sizes for i in node.all_input_nodes):
            sizes.add(node.name)
    return sizes


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).removeprefix("L['self'].").removeprefix("L['self']")


def _annotate(model: nn.Module, capture: _Capture, reference: Any = None) -> TracedGraph:
    """Annotate a captured graph; with a ``reference`` (the eager output), check it first.

    Metas come from export's recorded values when it left them; otherwise one
    interpreter run records them and also yields the output that is checked.
    """
    gm = capture.gm
    values = _recorded_values(gm) if capture.method == "export" else None
    if values is None or reference is not None:
        values, output = _run_recording(capture)
        if reference is not None:
            _check_output(capture.method, capture.unflatten(output), reference)
    metas, is_tensor = values

    # Canonical names: what model.named_parameters() yields (first name of a tied tensor).
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    for name, b in model.named_buffers():
        canonical.setdefault(id(b), name)
    tensors: dict[str, tuple[torch.Tensor, bool]] = {}
    aliases: dict[str, list[str]] = {}
    for is_buffer, named in ((False, gm.named_parameters(remove_duplicate=False)),
                             (True, gm.named_buffers(remove_duplicate=False))):
        for name, t in named:
            fqn = canonical.get(id(t), name)
            tensors.setdefault(fqn, (t, is_buffer))
            if name != fqn and name not in aliases.setdefault(fqn, []):
                aliases[fqn].append(name)
    by_local_name = {}
    for fqn, names in aliases.items():
        for n in names:
            by_local_name[n] = fqn
    for fqn in tensors:
        by_local_name.setdefault(fqn, fqn)

    sizes = _size_nodes(gm) if capture.method == "export" else set()
    modules = dict(gm.named_modules())
    node_params: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        reads: list[str] = []
        if node.op == "get_attr":
            if str(node.target) in by_local_name:
                reads.append(by_local_name[str(node.target)])
        elif node.op == "call_module":
            sub = modules[str(node.target)]
            prefix = f"{node.target}."
            for local, _ in list(sub.named_parameters(remove_duplicate=False)) + list(sub.named_buffers(remove_duplicate=False)):
                full = prefix + local
                if full in by_local_name and by_local_name[full] not in reads:
                    reads.append(by_local_name[full])
        else:
            for inp in node.all_input_nodes:
                if inp.op == "get_attr" and str(inp.target) in by_local_name:
                    fqn = by_local_name[str(inp.target)]
                    if fqn not in reads:
                        reads.append(fqn)
        node_params[node.name] = tuple(reads)

    users_of: dict[str, list[str]] = {fqn: [] for fqn in tensors}
    nodes: list[NodeInfo] = []
    for node in gm.graph.nodes:
        node_reads = node_params[node.name]
        for fqn in node_reads:
            users_of[fqn].append(node.name)
        nodes.append(
            NodeInfo(
                name=node.name,
                op=node.op,
                target=_target_name(node),
                inputs=tuple(n.name for n in node.all_input_nodes),
                users=tuple(u.name for u in node.users),
                outputs=metas.get(node.name, ()),
                module_path=_module_path(node),
                params=node_reads,
                param_bytes=sum(tensors[f][0].numel() * tensors[f][0].element_size() for f in node_reads),
                is_tensor=is_tensor.get(node.name, False),
                is_size=node.name in sizes,
            )
        )
    saved_keys = set(model.state_dict(keep_vars=True))
    params = {
        fqn: ParamInfo(
            fqn=fqn,
            shape=tuple(int(d) for d in t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            num_bytes=int(t.numel() * t.element_size()),
            numel=int(t.numel()),
            is_buffer=is_buffer,
            aliases=tuple(aliases.get(fqn, ())),
            users=tuple(users_of[fqn]),
            persistent=not is_buffer or fqn in saved_keys or any(a in saved_keys for a in aliases.get(fqn, ())),
        )
        for fqn, (t, is_buffer) in tensors.items()
    }
    return TracedGraph(
        graph_module=gm,
        method=capture.method,
        nodes=tuple(nodes),
        params=params,
        input_names=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"),
        example_inputs=capture.flat_inputs,
        model_name=type(model).__name__,
        _flatten=capture.flatten,
        _unflatten=capture.unflatten,
        input_structure=capture.structure,
        training=model.training,
        module_modes={name: m.training for name, m in model.named_modules(remove_duplicate=False)},
    )


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None)
    if name is None:
        return str(t)
    module = getattr(t, "__module__", None) or ""
    if "ops" in str(t):
        return str(t)
    return f"{module}.{name}" if module and module != "builtins" else name

