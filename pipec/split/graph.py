"""Splitting a traced graph: one stage's nodes copied into a graph of their own.

Phase: split. Input: a :class:`~pipec.types.TracedGraph`, the plan data and a
stage index. Output: a :class:`~pipec.split.stage.GraphStage`. The stage
reads every model input it needs directly (each rank has the full batch),
receives each boundary tensor straight from its producer, and holds copies
of the tensors its nodes read (``get_attr`` nodes are duplicated into every
stage that uses them) under their canonical FQNs. ``call_module`` nodes are
inlined (:func:`pipec.inlining.inline_module`: traced through with fx, or with
``torch.export`` on inputs of the recorded shapes when fx meets data-dependent
control flow).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.errors import ConfigError, PlanError
from pipec.inlining import inline_module
from pipec.mode_ops import is_mode_blind_random
from pipec.split.modes import follow_mode, seed_random_nodes
from pipec.split.stage import GraphStage, StageModule, fetch_attr, rebuild_output
from pipec.types import TracedGraph

if TYPE_CHECKING:
    from pipec.plan import PlanData

log = logging.getLogger(__name__)


def check_stage_index(data: PlanData, index: object) -> int:
    """``index`` when it names a stage of the plan, else ConfigError."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < data.num_stages:
        raise ConfigError(
            f"stage index: expected an int in 0..{data.num_stages - 1}, found {index!r}"
        )
    return index


def build_stage_module(traced: TracedGraph, data: PlanData, index: int) -> StageModule:
    """Stage ``index`` of the plan ``data`` split from ``traced`` (``plan.stage_module``
    of an in-memory plan; a loaded one reads its stage files, :mod:`pipec.codegen`)."""
    return _StageBuilder(traced, data, check_stage_index(data, index)).build()


# -- splitting the traced graph ----------------------------------------------------------

_NOT_COMPUTE = ("placeholder", "get_attr", "output")
_TRACED_NAME = "pipec_traced_name"  # node.meta key: the node's name in the whole traced graph


class _Leaf:
    """Stands for the i-th node of the output while its structure is worked out."""

    def __init__(self, i: int) -> None:
        self.i = i


class _StageBuilder:
    """Copies one stage's nodes of the traced graph into a new graph."""

    def __init__(self, traced: TracedGraph, data: PlanData, index: int) -> None:
        self.traced, self.data, self.index = traced, data, index
        self.gm = traced.graph_module
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}  # traced node name -> value in the new graph
        self.tensors: dict[str, torch.Tensor | nn.Module] = {}  # canonical name -> original
        self.attrs: dict[str, fx.Node] = {}
        self.canonical: dict[str, str] = {}  # any name of a tensor in gm -> canonical FQN
        for fqn, info in traced.params.items():
            self.canonical[fqn] = fqn
            self.canonical.update(dict.fromkeys(info.aliases, fqn))
        self.sizes = {n.name for n in traced.nodes if n.is_size}  # recomputed here when read

    def build(self) -> GraphStage:
        traced, index = self.traced, self.index
        is_last = index == self.data.num_stages - 1
        fx_nodes = {n.name: n for n in self.gm.graph.nodes}
        unknown = [n for n in self.data.stages[index].nodes if n not in fx_nodes]
        if unknown:
            raise PlanError(
                f"stage {index} lists nodes the traced graph does not have: {unknown[:5]}; "
                "the plan was made for another model -- re-run pipec.partition"
            )
        members = set(self.data.stages[index].nodes)
        # sizes of the inputs' shapes are made where a node reads them (:meth:`_size`), not copied
        compute = [n for n in self.gm.graph.nodes
                   if n.name in members and n.op not in _NOT_COMPUTE and n.name not in self.sizes]
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        graph_inputs, boundary_inputs, outputs = self._interface(compute, out_node if is_last else None, members)
        for name in graph_inputs + boundary_inputs:
            self.env[name] = self.graph.placeholder(name)
        for node in compute:
            if node.op == "call_module":
                self.env[node.name] = self._call_module(node)
            else:
                self.env[node.name] = self.graph.node_copy(node, self._lookup)
                self.env[node.name].meta[_TRACED_NAME] = node.name
        results: list[Any] = [self.env[name] for name in outputs]
        spec = None
        if is_last:
            value, spec = self._model_output(out_node)
            results.append(value)
        self.graph.output(tuple(results))
        self._follow_device(graph_inputs + boundary_inputs)
        follows_mode = follow_mode(self.graph, traced_training=self.traced.training, buffer=self._buffer)
        # the plan data lists them unless the model draws in eval too (pipec.partitioner.eval_random)
        blind = self._mode_blind_random() if self.traced.training and self.data.mode_blind_random else {}
        seed_random_nodes(self.graph, {n: n.meta[_TRACED_NAME] for n in self.graph.nodes if _TRACED_NAME in n.meta})
        self.graph.lint()
        requires_grad = self._requires_grad(boundary_inputs + outputs)
        return GraphStage(
            {name: _own_copy(t) for name, t in self.tensors.items()},
            self.graph,
            index=index,
            graph_input_names=graph_inputs,
            boundary_input_names=boundary_inputs,
            output_names=outputs,
            is_last=is_last,
            requires_grad=requires_grad,
            output_spec=spec,
            aliases={f: traced.params[f].aliases for f in self.tensors
                     if f in traced.params and traced.params[f].aliases},
            non_persistent=self._non_persistent(),
            class_name=f"Stage{index}",
            traced_training=self.traced.training,
            follows_mode=follows_mode,
            mode_blind_random=blind,
        )

    def _mode_blind_random(self) -> dict[str, str]:
        """The stage's random nodes that draw in eval too, by traced-graph name -> module path."""
        paths = {n.name: n.module_path for n in self.traced.nodes}
        found: dict[str, str] = {}
        for node in self.graph.nodes:
            if is_mode_blind_random(node):
                name = str(node.meta.get(_TRACED_NAME, node.name))
                found[name] = paths.get(name.partition("/")[0]) or ""
        return found

    # -- what crosses the stage's border ---------------------------------------------
    def _interface(
        self, compute: list[fx.Node], out_node: fx.Node | None, members: set[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        order = {n.name: i for i, n in enumerate(self.traced.nodes)}
        read_inputs: set[str] = set()
        received: set[str] = set()
        sizes: dict[str, fx.Node] = {}  # the sizes of the inputs' shapes its nodes read, transitively
        for node in compute + ([out_node] if out_node is not None else []):
            for inp in node.all_input_nodes:
                if inp.name in self.sizes:
                    self._sizes_read(inp, sizes)
                elif inp.op == "placeholder":
                    read_inputs.add(inp.name)
                elif inp.op != "get_attr" and inp.name not in members:
                    received.add(inp.name)
        incoming = {b.name for b in self.data.boundaries if self.index in b.consumer_stages}
        read_inputs |= self._inputs_for_sizes(sizes.values(), read_inputs, incoming, members)
        missing = sorted(received - incoming, key=lambda n: order.get(n, -1))
        if missing:
            raise PlanError(
                f"stage {self.index} reads {missing[:5]} from other stages, but the plan's "
                "boundaries do not send them there; re-run pipec.partition (or fix the boundaries "
                "given to plan_from_split)"
            )
        outgoing = {b.name for b in self.data.boundaries if b.producer_stage == self.index}
        for name in incoming | outgoing:
            if name not in order:
                raise PlanError(f"boundary {name!r} is not a node of the traced graph; re-run pipec.partition")
        foreign = sorted(outgoing - members)
        if foreign:
            raise PlanError(f"stage {self.index} must send {foreign[:5]} but does not compute them; "
                            "re-run pipec.partition")
        for name in incoming | outgoing:
            if len(self.traced.node(name).outputs) != 1:
                raise PlanError(f"boundary {name!r} is not a single tensor (it holds "
                                f"{len(self.traced.node(name).outputs)}); cut the graph elsewhere")
        graph_inputs = tuple(n for n in self.traced.input_names if n in read_inputs)
        return (graph_inputs, tuple(sorted(incoming, key=order.__getitem__)),
                tuple(sorted(outgoing, key=order.__getitem__)))

    # -- sizes of the inputs' shapes ------------------------------------------------------
    def _sizes_read(self, node: fx.Node, into: dict[str, fx.Node]) -> None:
        """``node`` (a size) and the sizes it is computed from, into ``into``."""
        if node.name in into:
            return
        into[node.name] = node
        for inp in node.all_input_nodes:
            if inp.name in self.sizes:
                self._sizes_read(inp, into)

    def _inputs_for_sizes(self, sizes: Iterable[fx.Node], read_inputs: set[str], incoming: set[str],
                          members: set[str]) -> set[str]:
        """The model inputs the stage must read to recompute ``sizes``: for each
        ``sym_size`` whose tensor the stage does not hold and none of its inputs has
        that dim, the first model input that has it (the runtime hands any stage
        the inputs it names)."""
        extra: set[str] = set()
        for node in sizes:
            if node.target is not torch.ops.aten.sym_size.int:
                continue
            tensor = node.args[0]
            if isinstance(tensor, fx.Node) and (tensor.name in members or tensor.name in incoming
                                                or tensor.name in read_inputs | extra):
                continue
            held = [n for n in self.gm.graph.nodes if n.name in incoming | read_inputs | extra]
            if self._dim_of(node, held) is not None:
                continue
            carriers = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
            found = self._dim_of(node, carriers)
            if found is None:
                raise PlanError(f"stage {self.index} reads the size {node.name!r}, which no model input "
                                "has as a dim; re-trace the model (pipec.trace) and partition again")
            extra.add(found[0].name)
        return extra

    @staticmethod
    def _dim_of(size: fx.Node, tensors: list[fx.Node]) -> tuple[fx.Node, int] | None:
        """The first of ``tensors`` (traced nodes) with a dim equal to the symbolic size
        ``size`` (a ``sym_size`` node of the traced graph), and that dim."""
        wanted = size.meta["val"].node.expr
        for t in tensors:
            shape = getattr(t.meta.get("val"), "shape", ())
            for d, extent in enumerate(shape):
                if isinstance(extent, torch.SymInt) and extent.node.expr == wanted:
                    return t, d
        return None

    def _size(self, node: fx.Node) -> fx.Node:
        """The stage's own copy of the size ``node`` (memoised): a ``sym_size`` of
        the tensor it was taken of when the stage holds it, else of a tensor the
        stage received or reads with the same dim -- a boundary first, then a
        model input --; arithmetic on sizes is copied with its operands made alike."""
        made = self.env.get(node.name)
        if isinstance(made, fx.Node):
            return made
        if node.target is torch.ops.aten.sym_size.int:
            tensor, dim = node.args[0], node.args[1]
            if isinstance(tensor, fx.Node) and tensor.name in self.env:
                source, d = self.env[tensor.name], dim
            else:
                traced_nodes = {n.name: n for n in self.gm.graph.nodes}
                held = [traced_nodes[n.name] for n in self.graph.nodes if n.op == "placeholder"]
                boundary_first = sorted(held, key=lambda n: n.op == "placeholder")
                found = self._dim_of(node, boundary_first)
                if found is None:
                    raise PlanError(f"stage {self.index} cannot recompute the size {node.name!r}: none "
                                    "of its inputs has that dim; re-run pipec.partition")
                source, d = self.env[found[0].name], found[1]
            made = self.graph.create_node("call_function", torch.ops.aten.sym_size.int, (source, d), name=node.name)
        else:
            made = self.graph.node_copy(node, self._lookup)
        made.meta[_TRACED_NAME] = node.name
        self.env[node.name] = made
        return made

    # -- nodes ---------------------------------------------------------------------------
    def _lookup(self, node: fx.Node) -> Any:
        if node.name in self.sizes:
            return self._size(node)
        if node.op == "get_attr":
            target = str(node.target)
            return self._attr(self.canonical.get(target, target), fetch_attr(self.gm, target))
        return self.env[node.name]

    def _attr(self, name: str, value: Any) -> fx.Node:
        if name not in self.attrs:
            if not isinstance(value, (torch.Tensor, nn.Module)):
                raise PlanError(f"attribute {name!r} read by the graph is a {type(value).__name__}, "
                                "not a tensor or module; pipec cannot place it on a stage")
            self.attrs[name] = self.graph.get_attr(name)
            self.tensors[name] = value
        return self.attrs[name]

    def _buffer(self, fqn: str) -> fx.Node | None:
        """A ``get_attr`` node of the model's tensor ``fqn`` (added to the stage), None if it has none."""
        try:
            value = fetch_attr(self.gm, fqn)
        except AttributeError:
            return None
        return self._attr(self.canonical.get(fqn, fqn), value) if isinstance(value, torch.Tensor) else None

    def _call_module(self, node: fx.Node) -> Any:
        path = str(node.target)
        module = self.gm.get_submodule(path)
        with _modes_at_trace(module, path, self.traced.module_modes):
            inlined = inline_module(module, node, self.traced)
        if inlined is None:
            shared = [n for n, _ in module.named_parameters(remove_duplicate=False)
                      if self.canonical.get(f"{path}.{n}", f"{path}.{n}") != f"{path}.{n}"]
            if shared:
                raise PlanError(f"module {path!r} ({type(module).__name__}) shares parameters "
                                f"{shared} with another module and cannot be traced through; "
                                "partition with method='export'")
            log.info("stage %d keeps module %s (%s) opaque", self.index, path, type(module).__name__)
            self.tensors[path] = module
            return self.graph.node_copy(node, self._lookup)
        sub, inputs, rebuild = inlined
        local: dict[fx.Node, Any] = {}
        places = iter(inputs)
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                value = next(places)
                local[n] = self._lookup(value) if isinstance(value, fx.Node) else value
            elif n.op == "get_attr":
                full = f"{path}.{n.target}"
                local[n] = self._attr(self.canonical.get(full, full), fetch_attr(sub, str(n.target)))
            elif n.op == "output":
                return rebuild(fx.node.map_arg(n.args[0], local.__getitem__))
            elif n.op == "call_module":  # torch.export's input guard
                continue
            else:
                local[n] = self.graph.node_copy(n, local.__getitem__)
                local[n].meta[_TRACED_NAME] = f"{node.name}/{n.name}"  # stable however the graph is cut
        raise PlanError(f"module {path!r} traced to a graph without an output")

    # -- the model's output ----------------------------------------------------------------
    def _model_output(self, out_node: fx.Node) -> tuple[Any, str | None]:
        nodes: list[fx.Node] = []

        def leaf(n: fx.Node) -> Any:  # a stand-in where fx expects an Argument
            nodes.append(n)
            return _Leaf(len(nodes) - 1)

        structure = self.traced.unflatten_output(fx.node.map_arg(out_node.args[0], leaf))
        plain = _plain(structure)
        plain_leaves, plain_spec = pytree.tree_flatten(plain)

        def value(x: Any) -> Any:
            return self._lookup(nodes[x.i]) if isinstance(x, _Leaf) else x

        plain_text = _dumps(plain_spec)
        if _is_plain(structure):
            return pytree.tree_map(value, plain), plain_text
        leaves, spec = pytree.tree_flatten(structure)
        if [id(x) for x in leaves] != [id(x) for x in plain_leaves]:
            plain_text = None  # the plain containers order the leaves differently
        exact_text = _dumps(spec)
        rebuilt = self.graph.call_function(
            rebuild_output, (exact_text, plain_text, [value(x) for x in leaves]))
        return rebuilt, exact_text or plain_text

    def _follow_device(self, inputs: tuple[str, ...]) -> None:
        """Make ``device=<trace device>`` constants (torch.export bakes them into
        ``arange``, ``to``, ...) read the device of one of the stage's tensors, so a
        stage moved with ``.to(device)`` creates its new tensors there too."""
        traced_on = next((x.device for x in self.traced.example_inputs if isinstance(x, torch.Tensor)),
                         torch.device("cpu"))
        sites = [n for n in self.graph.nodes if n.op == "call_function"
                 and isinstance(n.kwargs.get("device"), (torch.device, str))
                 and torch.device(n.kwargs["device"]) == traced_on]
        tensors = [n for n, t in self.tensors.items() if isinstance(t, torch.Tensor)]
        placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        carriers = [placeholders[n] for n in inputs if n in placeholders and self._is_tensor(n)]
        if not sites or not (tensors or carriers):
            return
        with self.graph.inserting_before(sites[0]):
            anchor = self.graph.get_attr(tensors[0]) if tensors else carriers[0]
            device = self.graph.create_node("call_function", getattr, (anchor, "device"), name="stage_device")
        for n in sites:
            n.kwargs = {**n.kwargs, "device": device}

    def _is_tensor(self, name: str) -> bool:
        return any(i.name == name and i.meta is not None for i in self.data.inputs) or any(
            b.name == name for b in self.data.boundaries)

    # -- facts about tensors ----------------------------------------------------------------
    def _requires_grad(self, names: tuple[str, ...]) -> dict[str, bool]:
        trainable = {self.canonical.get(n, n) for n, p in self.gm.named_parameters(remove_duplicate=False)
                     if p.requires_grad}
        depends: dict[str, bool] = {}
        for info in self.traced.nodes:
            depends[info.name] = any(p in trainable for p in info.params) or any(
                depends.get(i, False) for i in info.inputs)
        return {n: depends[n] and self.traced.node(n).outputs[0].is_floating for n in names}

    def _non_persistent(self) -> list[str]:
        out: list[str] = []
        flagged: set[str] = set()
        for path, module in self.gm.named_modules(remove_duplicate=False):
            for b in module._non_persistent_buffers_set:
                full = f"{path}.{b}" if path else b
                flagged.add(self.canonical.get(full, full))
        for name, t in self.tensors.items():
            info = self.traced.params.get(name)
            if not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter):
                continue
            if info is None or name in flagged or not getattr(info, "persistent", True):
                out.append(name)
        return out


@contextlib.contextmanager
def _modes_at_trace(module: nn.Module, path: str, modes: Mapping[str, bool]) -> Iterator[None]:
    """Trace an fx leaf module through in the train/eval modes its submodules had when
    the model was traced (the module is the user's: its mode may have changed since)."""
    saved = [(m, m.training) for _, m in module.named_modules(remove_duplicate=False)]
    try:
        for name, m in module.named_modules(remove_duplicate=False):
            m.training = modes.get(f"{path}.{name}" if name else path, m.training)
        yield
    finally:
        for m, training in saved:
            m.training = training


def _own_copy(value: torch.Tensor | nn.Module) -> torch.Tensor | nn.Module:
    if isinstance(value, nn.Module):
        return copy.deepcopy(value)
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    return value.detach().clone()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _is_plain(value: Any) -> bool:
    if type(value) in (dict, fx.immutable_collections.immutable_dict):
        return all(_is_plain(v) for v in value.values())
    if type(value) in (list, tuple, fx.immutable_collections.immutable_list):
        return all(_is_plain(v) for v in value)
    return not isinstance(value, (Mapping, list, tuple))


def _dumps(spec: pytree.TreeSpec) -> str | None:
    try:
        return pytree.treespec_dumps(spec)
    except Exception:
        return None
