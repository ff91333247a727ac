"""Run a traced graph one node at a time, so each node can be timed or counted alone.

Phase: profile / cost model (shared by :mod:`pipec.profiling`, which times
nodes on a device, and :mod:`pipec.costs.analytic`, which counts FLOPs and
bytes on fake tensors).

Input: a :class:`~pipec.types.TracedGraph`. :func:`walk` interprets its graph
module (``torch.fx.Interpreter``) and, for every compute node, hands a
:class:`NodeRun` to a visitor: the node's op, its captured input values, which
of those need an input gradient (``input_leaves``, the I in zero-bubble
terms) and which trainable parameters it reads (``params``, the W) -- a
``call_module`` node's module parameters, or for a ``call_function`` node the
values of its ``get_attr`` inputs that require grad.

Every value is stored back as a detached leaf that keeps ``requires_grad``,
so a node's backward never reaches into its producers, yet which tensors need
gradients is decided by autograd itself, exactly as in the whole model.

Output: per node, ``saved_bytes`` -- the bytes autograd keeps for backward
(``torch.autograd.graph.saved_tensors_hooks``), each storage counted once and
attributed to the node that *produced* it, so summing over any set of nodes
never counts a tensor twice. Excluded: parameters and buffers (counted as
parameter memory) and the graph's inputs (the micro-batch, held anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.types import TracedGraph

FREE_OPS = ("placeholder", "get_attr", "output")


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (works for real, meta and fake tensors)."""
    return int(t.untyped_storage()._cdata)


def storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def tensors_in(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def backward_targets(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs a gradient flows into, and a gradient (ones) for each."""
    outs = [t for t in tensors_in(output) if t.requires_grad]
    return outs, [torch.ones_like(t) for t in outs]


def _detached(value: Any) -> Any:
    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter):
            return x.detach().requires_grad_(x.requires_grad)
        return x

    return pytree.tree_map(leaf, value)


@dataclass
class NodeRun:
    """One compute node, executed once, ready to be re-run by a visitor.

    ``output`` is the value of the first run, still connected to autograd
    (``input_leaves`` and ``params`` are its leaves). ``call(*fresh_args())``
    runs the op again; for a node that mutates an input in place
    (``mutates``), ``fresh_args`` returns new clones each time.
    """

    node: fx.Node
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_leaves: tuple[torch.Tensor, ...]
    params: tuple[torch.Tensor, ...]
    output: Any
    mutates: bool = False
    _clone_ids: frozenset[int] = field(default=frozenset(), repr=False)

    def fresh_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.mutates:
            return self.args, self.kwargs
        ids = self._clone_ids

        def fresh(x: Any) -> Any:
            return x.clone() if isinstance(x, torch.Tensor) and id(x) in ids else x

        args, kwargs = pytree.tree_map(fresh, (self.args, self.kwargs))
        return args, kwargs

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.fn(*args, **kwargs)


Visitor = Callable[[NodeRun], None]


class NodeFailure(RuntimeError):
    """A node's op (or a visitor on it) raised; carries the node and the error."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(f"node {node.name!r} failed: {type(error).__name__}: {error}")
        self.node = node
        self.error = error


class _Walker(fx.Interpreter):
    def __init__(
        self,
        gm: fx.GraphModule,
        visit: Visitor,
        *,
        device: torch.device | None,
        to_fake: Callable[[torch.Tensor], torch.Tensor] | None,
        meta_as: torch.device | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.visit = visit
        self.device = device
        self.to_fake = to_fake
        self.meta_as = meta_as
        self.param_ids: set[int] = set()
        self.held_keys: set[int] = set()  # parameters, buffers, graph inputs
        self.keep_alive: list[torch.Tensor] = []
        self.owner: dict[int, str] = {}  # storage -> node that produced it
        self.owned_bytes: dict[int, int] = {}
        self.saved_owned: set[int] = set()  # storages some backward keeps
        self.temp_bytes: dict[str, int] = {}  # saved storages born inside a node
        self.modules = dict(gm.named_modules())
        if to_fake is None:
            for t in [*gm.parameters(), *gm.buffers()]:
                self.held_keys.add(storage_key(t))

    # -- values ------------------------------------------------------------
    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        if self.to_fake is not None:
            return self.to_fake(t)
        if self.device is not None and t.device != self.device:
            moved = t.to(self.device)
            return nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
        return t

    def _hold(self, value: Any, *, param: bool) -> Any:
        value = pytree.tree_map(lambda x: self._convert(x) if isinstance(x, torch.Tensor) else x, value)
        for t in tensors_in(value):
            # keep it alive: a freed storage's key could be reused by a later output
            self.keep_alive.append(t)
            self.held_keys.add(storage_key(t))
            if param and t.requires_grad:
                self.param_ids.add(id(t))
        return value

    # -- nodes -------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return self._hold(super().run_node(n), param=False)
        if n.op == "get_attr":
            return self._hold(super().run_node(n), param=True)
        if n.op == "output":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.meta_as is not None:  # a graph traced on the meta device names it in its device arguments
            args, kwargs = pytree.tree_map(
                lambda x: self.meta_as if isinstance(x, torch.device) and x.type == "meta" else x, (args, kwargs))
        try:
            fn, params = self._op(n)
            run = self._first_run(n, fn, tuple(args), dict(kwargs), params)
        except NodeFailure:
            raise
        except Exception as err:
            raise NodeFailure(n, err) from err
        self.visit(run)
        for t in tensors_in(run.output):
            key = storage_key(t)
            if key not in self.owner and key not in self.held_keys:
                self.owner[key] = n.name
                self.owned_bytes[key] = storage_bytes(t)
        return _detached(run.output)

    def _op(self, n: fx.Node) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
        if n.op == "call_module":
            module = self.modules[str(n.target)]
            if self.to_fake is None:
                return module, tuple(p for p in module.parameters() if p.requires_grad)
            fakes = {
                name: self._hold(t, param=t.requires_grad)
                for name, t in [*module.named_parameters(), *module.named_buffers()]
            }

            def call_fake(*a: Any, **k: Any) -> Any:
                return torch.func.functional_call(module, fakes, a, k)

            return call_fake, tuple(t for t in fakes.values() if id(t) in self.param_ids)
        if n.op == "call_method":
            method = str(n.target)

            def call_method(obj: Any, *a: Any, **k: Any) -> Any:
                return getattr(obj, method)(*a, **k)

            return call_method, ()
        target = n.target
        assert callable(target)  # fx guarantees it for call_function
        return target, ()

    def _first_run(
        self,
        n: fx.Node,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        module_params: tuple[torch.Tensor, ...],
    ) -> NodeRun:
        inputs = tensors_in((args, kwargs))
        params = module_params + tuple(t for t in inputs if id(t) in self.param_ids)
        leaves = tuple(t for t in inputs if t.requires_grad and id(t) not in self.param_ids)
        run = NodeRun(n, fn, args, kwargs, leaves, params, output=None)
        saved: dict[int, int] = {}
        versions = [t._version for t in inputs]
        try:
            with torch.enable_grad(), _saving(saved):
                run.output = fn(*args, **kwargs)
        except RuntimeError as err:
            if "in-place" not in str(err):
                raise
            # An in-place op on a tensor that needs grad: run it on clones (the
            # clone is part of the op's autograd graph) and write the result back.
            run.mutates, run._clone_ids = True, frozenset(id(t) for t in leaves)
            args2, kwargs2 = run.fresh_args()
            saved.clear()
            with torch.enable_grad(), _saving(saved):
                run.output = fn(*args2, **kwargs2)
            with torch.no_grad():
                for old, new in zip(inputs, tensors_in((args2, kwargs2))):
                    if new is not old and new._version > 0:
                        old.copy_(new)
        mutated = frozenset(id(t) for t, v in zip(inputs, versions) if t._version != v)
        if mutated:
            run.mutates, run._clone_ids = True, run._clone_ids | mutated
        self._account(n.name, saved, run.output)
        return run

    def _account(self, name: str, saved: dict[int, int], output: Any) -> None:
        own = {storage_key(t) for t in tensors_in(output)}
        temp = 0
        for key, num_bytes in saved.items():
            if key in self.held_keys:
                continue
            if key in self.owner:
                self.saved_owned.add(key)
            elif key in own:
                self.saved_owned.add(key)  # owner recorded right after the visit
            else:
                temp += num_bytes
        self.temp_bytes[name] = temp

    def saved_bytes(self) -> dict[str, int]:
        result = dict(self.temp_bytes)
        for key in self.saved_owned:
            name = self.owner.get(key)
            if name is not None:
                result[name] = result.get(name, 0) + self.owned_bytes[key]
        return result


@contextmanager
def _saving(saved: dict[int, int]) -> Iterator[None]:
    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[storage_key(t)] = storage_bytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def walk(
    traced: TracedGraph,
    visit: Visitor,
    *,
    device: torch.device | None = None,
    to_fake: Callable[[torch.Tensor], torch.Tensor] | None = None,
    meta_as: torch.device | None = None,
) -> dict[str, int]:
    """Run every node of ``traced`` once, calling ``visit`` on each compute node.

    ``device``: move graph inputs and attributes there (the graph module itself
    must already be there). ``to_fake``: convert inputs and parameters to fake
    tensors (``FakeTensorMode.from_tensor``) instead; the caller enters the mode.
    ``meta_as``: a device that replaces ``meta`` in the nodes' device arguments
    (with a ``to_fake`` that fakes meta tensors on it).
    Returns ``saved_bytes`` per compute node (see the module docstring).
    """
    walker = _Walker(traced.graph_module, visit, device=device, to_fake=to_fake, meta_as=meta_as)
    walker.run(*traced.example_inputs)
    return walker.saved_bytes()


__all__ = ["FREE_OPS", "NodeFailure", "NodeRun", "backward_targets", "storage_bytes", "storage_key", "tensors_in",
           "walk"]
