"""Capture by ``torch.export`` (non-strict), batch and sequence dims kept symbolic
(phase 1, trace; see :mod:`pipec.tracing`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.errors import TraceError
from pipec.microbatch import flatten_by_spec
from pipec.tracing.capture import _Capture, _headline, _message
from pipec.types import InputStructure

log = logging.getLogger(__name__)

# -- export ----------------------------------------------------------------------

#: torch loggers that warn (with whole graph dumps) while export fails on a
#: data-dependent branch; pipec reports the failure itself as one TraceError.
_NOISY_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """Keep torch.export's own warnings and the partial graph it prints to
    stderr on failure off the terminal; they go to this module's DEBUG log."""
    loggers = [logging.getLogger(name) for name in _NOISY_EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if printed.getvalue().strip():
            log.debug("torch.export printed:\n%s", printed.getvalue())


def _trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Capture:
    gm = _export_module(model, args, kwargs)
    if not isinstance(gm, fx.GraphModule):
        raise TraceError("torch.export returned no fx.GraphModule")
    in_spec = gm._in_spec
    out_spec = gm._out_spec
    if out_spec is None:
        raise TraceError("torch.export returned a module without an output spec")
    # Plain calling convention: one argument per placeholder, flat tuple out.
    gm.graph._codegen = fx.graph.CodeGen()
    # export's input check (a forward pre-hook) matches the call against the
    # (args, kwargs) structure it was exported with, so a plain call with the
    # keyword inputs flattened into positions fails it; ``flatten`` below checks
    # the user's structure instead.
    if hasattr(gm, "validate_inputs"):
        setattr(gm, "validate_inputs", False)  # noqa: B010 -- an attribute of export's module subclass
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)
    gm.graph.eliminate_dead_code()
    gm.recompile()

    def flatten(a: tuple[Any, ...], kw: Mapping[str, Any]) -> tuple[Any, ...]:
        return flatten_by_spec(a, kw, in_spec)  # what flatten_call does for a loaded plan

    def unflatten(out: Any) -> Any:
        return pytree.tree_unflatten(list(out), out_spec)

    try:
        structure: InputStructure | None = InputStructure(in_spec=pytree.treespec_dumps(in_spec))
    except Exception as exc:  # an input type pytree cannot write: a loaded plan binds by name
        log.info("the input structure %s cannot be saved (%s); a loaded plan binds inputs by name", in_spec, exc)
        structure = None
    return _Capture(gm, "export", flatten(args, kwargs), flatten, unflatten, structure)


def _export_module(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> nn.Module:
    """``torch.export`` with every dim of every tensor input ``Dim.AUTO``, else static.

    With ``Dim.AUTO`` export keeps a dim symbolic unless the model's code pins it
    (it then specialises that dim to the example's size, as a static export would),
    so the graph's views and reshapes read ``sym_size`` of the inputs instead of
    the example's sizes and a step may take another batch size or sequence length
    (:mod:`pipec.split` recomputes those sizes in each stage). A dim of size 0 or
    1 in the example is specialised by export (it cannot tell it from a broadcast).
    Should dynamic export fail, the model is exported with the example's shapes
    and the log says so: the plan then runs on batches shaped like the example.
    """
    tensors = [x for x in pytree.tree_leaves((args, dict(kwargs))) if isinstance(x, torch.Tensor)]
    static: set[tuple[int, int]] = set()  # (tensor, dim) export narrowed: traced with the example's size
    for _ in range(2):
        if not tensors:
            break
        dims = torch.export.ShapesCollection()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        for i, x in enumerate(tensors):
            dims[x] = {d: torch.export.Dim.STATIC if (i, d) in static else torch.export.Dim.AUTO
                       for d in range(x.dim())}
        try:
            spec = dims.dynamic_shapes(model, args, dict(kwargs))  # type: ignore[no-untyped-call]
            ep = torch.export.export(model, args, dict(kwargs), dynamic_shapes=spec, strict=False)
        except Exception as exc:  # anything torch raises; the static export below says if it is the model
            log.info("%s: torch.export with dynamic shapes failed (%s); exporting with the example's "
                     "shapes, so steps must use batches shaped like the example",
                     type(model).__name__, _headline(_message(exc)))
            break
        narrowed = _narrowed_dims(ep, tensors)
        if not narrowed:
            return _dynamic_dims_logged(model, ep.module())
        # The graph is valid only for sizes in a range (the model branches on them) and
        # the guard that checks it does not survive the split: pin those dims instead.
        log.info("%s: the model's code limits input dims %s to a range of sizes; they are traced with "
                 "the example's sizes", type(model).__name__, sorted(narrowed))
        static |= narrowed
    else:
        if tensors:
            log.info("%s: export narrowed input dims again; exporting with the example's shapes",
                     type(model).__name__)
    return torch.export.export(model, args, dict(kwargs), strict=False).module()


def _narrowed_dims(ep: torch.export.ExportedProgram, tensors: list[torch.Tensor]) -> set[tuple[int, int]]:
    """The (input tensor, dim) whose size export kept symbolic but only within a range
    narrower than ``[2, inf)``: the model's code branched on it, and export's guard
    (dropped with ``_guards_fn``, see :func:`_trace_export`) would be the only check."""
    user = set(ep.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    inputs = [v for v in values if isinstance(v, torch.Tensor)]
    if len(inputs) != len(tensors):  # not the inputs' order: pin every dim export narrowed anywhere
        inputs = []
        if any(_narrow(b) for b in ep.range_constraints.values()):
            return {(i, d) for i, x in enumerate(tensors) for d in range(x.dim())}
    narrowed: set[tuple[int, int]] = set()
    for i, val in enumerate(inputs):
        for d, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            bounds = ep.range_constraints.get(size.node.expr)
            if bounds is not None and _narrow(bounds):
                narrowed.add((i, d))
    return narrowed


def _narrow(bounds: Any) -> bool:
    """Whether a symbol's value range is narrower than export's default ``[2, inf)``."""
    from torch.utils._sympy.numbers import int_oo  # sympy's oo for sizes (its is_finite is True)

    return bool(int(bounds.lower) > 2 or bounds.upper != int_oo)


def _dynamic_dims_logged(model: nn.Module, gm: nn.Module) -> nn.Module:
    """``gm``, after logging which input dims stayed symbolic (the rest are the example's)."""
    shown = []
    for node in gm.graph.nodes if isinstance(gm, fx.GraphModule) else ():
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            dynamic = [d for d, size in enumerate(val.shape)
                       if isinstance(size, torch.SymInt) and not size.node.expr.is_number]
            shown.append(f"{node.name} dims {dynamic}" if dynamic else f"{node.name} static")
    log.info("%s exported with dynamic shapes: %s", type(model).__name__, ", ".join(shown) or "no tensor inputs")
    return gm


