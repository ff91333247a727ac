"""Phase 1, trace: capture a model as an fx graph and annotate every node.

Input: an ``nn.Module`` and an example call ``(example_inputs, example_kwargs)``.
Output: a :class:`pipec.types.TracedGraph` -- an ``fx.GraphModule`` called with
one value per placeholder, plus per-node tensor shapes, owning module paths
and the parameters each node reads by their original FQN.

Two capture methods:

- ``"fx"``: ``torch.fx.symbolic_trace`` (modules named in ``leaf_modules``
  stay opaque). Keeps ``call_module`` nodes, so module paths are exact.
- ``"export"``: ``torch.export.export(..., strict=False)`` and its unlifted
  graph module; the way in for models fx cannot trace (every HF transformers
  model since v5). Every input dim is ``Dim.AUTO``: export keeps symbolic the
  dims the model does not pin (batch, sequence length), so views read
  ``sym_size`` of the inputs (``NodeInfo.is_size``; each stage recomputes
  them) and a step may take other sizes. Dims export narrows to a range, or
  a whole failed dynamic export, fall back to the example's sizes (logged).
  Metas, and so costs and memory, are the example's sizes either way.

``"auto"`` tries fx, checks the graph reproduces the model's output and that
every module it leaves opaque can be inlined into stage code
(:mod:`pipec.inlining`), and falls back to export when fx fails, differs or
could not be saved; the log says which method was used and why.

An HF model whose config has ``use_cache=True`` (the default of most decoder
configs) returns its KV cache, which neither method captures: when every
method fails on such a model, it is traced again with ``use_cache=False`` and
a warning says so. Tracing leaves the model as it was (:mod:`pipec._preserve`).

What runs, and why it is cheap: a forward of a large model on a laptop CPU
takes tens of seconds, so the tracer runs as few as it can.

- fx graphs come from symbolic tracing, which can silently bake in Python
  values, so each is checked against the eager model on the example inputs
  (same RNG seed). The one interpreter run that computes the graph's output
  for that comparison also records every node's :class:`TensorMeta`: eager
  reference + one graph run.
- export graphs come from running the model's own forward on fake tensors;
  whatever export could not reproduce it raises on. Each node's
  ``meta["val"]`` already holds a fake tensor with its shape and dtype, so the
  metas come from there and nothing runs on real data (an interpreter run
  is the fallback for a node without one).
- The eager model runs only where its output is compared (fx), or after
  every method failed, to say whether the model itself fails on the inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec._preserve import preserved
from pipec.errors import ConfigError, TraceError
from pipec.inlining import opaque_modules
from pipec.microbatch import flatten_by_spec, flatten_call
from pipec.types import InputStructure, NodeInfo, ParamInfo, TensorMeta, TracedGraph

log = logging.getLogger(__name__)

METHODS = ("auto", "fx", "export")

LeafSpec = type[nn.Module] | str


def trace(
    model: nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    method: str = "auto",
    leaf_modules: Iterable[LeafSpec] = (),
    check: bool = True,
) -> TracedGraph:
    """Trace ``model`` called as ``model(*example_inputs, **example_kwargs)``.

    ``leaf_modules`` (fx only) lists module classes or qualified names kept as
    single opaque nodes. ``check`` compares an fx graph's output with the eager
    model's on the example inputs; a mismatch is a :class:`TraceError` (and
    ``"auto"`` falls back to export). An export graph is not re-run: export
    traced the model's own forward on these inputs (see the module docstring).
    A model with ``config.use_cache=True`` that no method can trace is traced
    with ``use_cache=False`` (unless ``example_kwargs`` sets ``use_cache``), with
    a warning. The model's buffers, modes and the RNG state come out unchanged.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a torch.nn.Module, found {type(model).__name__}; "
            "wrap a plain function in an nn.Module whose forward calls it"
        )
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, found {method!r}")
    args = _as_args(example_inputs)
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ConfigError(
            f"example_kwargs: expected a dict of keyword arguments for forward, found "
            f"{type(example_kwargs).__name__}; pass e.g. {{'attention_mask': mask}}, or put "
            "positional arguments in example_inputs"
        )
    kwargs = dict(example_kwargs or {})
    _check_signature(model, args, kwargs)
    # running the model (eagerly and as a graph) must leave it as it was: batch-norm
    # statistics, RNG state, modes (pipec._preserve)
    leaves = tuple(leaf_modules)
    with preserved(model):
        try:
            return _trace(model, args, kwargs, method, leaves, check)
        except _Failed as failed:
            tried = failed.tried
        configs = [] if "use_cache" in kwargs else _kv_cache_configs(model)
        if not configs:
            raise _trace_error(model, method, tried) from None
        # An HF model whose config says use_cache=True returns its KV cache (a
        # DynamicCache neither method can capture, or branches on it). Training
        # through a pipeline has no use for it: trace without, and say so.
        with _kv_cache_off(configs):
            try:
                traced = _trace(model, args, kwargs, method, leaves, check)
            except _Failed as again:
                raise _trace_error(model, method, again.tried, kv_cache_off=True) from None
    log.warning(
        "%s: traced with use_cache=False -- its config has use_cache=True, and with it "
        "%s could not trace the model (%s). The plan's output has no past_key_values "
        "(training does not use them). Set model.config.use_cache = False before partitioning "
        "to skip the failed attempt and this warning", traced.model_name,
        "/".join(m for m, _ in tried), "; ".join(f"{m}: {_headline(why)}" for m, why in tried))
    return traced


class _Failed(Exception):
    """Every method failed (the model itself runs): ``tried`` holds (method, full reason)."""

    def __init__(self, tried: list[tuple[str, str]]) -> None:
        super().__init__(tried)
        self.tried = tried


def _trace(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], method: str,
           leaves: tuple[LeafSpec, ...], check: bool) -> TracedGraph:
    """Try the methods in turn (see :func:`trace`); inputs already checked.

    With ``method="auto"`` an fx graph is kept only if every module it leaves
    opaque can be inlined (:func:`pipec.inlining.opaque_modules`) -- else its
    plan could not be written as stage code -- and export is tried; should
    export fail too, the fx graph is returned (it runs in memory) with a warning.
    """
    reference: list[Any] = []  # the eager output, computed on first need

    def eager() -> Any:
        if not reference:
            reference.append(_run_eager(model, args, kwargs))
        return reference[0]

    if _has_lazy_parameters(model):
        eager()  # the first forward materialises lazy parameters; trace the initialised model
    tried: list[tuple[str, str]] = []
    unsaveable: TracedGraph | None = None  # an fx graph that runs but cannot be written as code
    for candidate in ("fx", "export") if method == "auto" else (method,):
        try:
            if candidate == "fx":
                capture = _trace_fx(model, args, kwargs, leaves)
            else:
                with _quiet_torch_export():
                    capture = _trace_export(model, args, kwargs)
        except TraceError as exc:
            tried.append((candidate, str(exc)))
            continue
        except Exception as exc:  # anything torch raises while tracing
            tried.append((candidate, _message(exc)))
            continue
        # outside the try: a model that fails on its inputs is that error, not a method's
        expected = eager() if check and candidate == "fx" else None
        try:
            traced = _annotate(model, capture, expected)
        except TraceError as exc:
            tried.append((candidate, str(exc)))
            continue
        except Exception as exc:  # the graph fails where the model ran
            tried.append((candidate, _message(exc)))
            continue
        opaque = opaque_modules(traced) if candidate == "fx" else []
        if opaque:
            why = _opaque_reason(traced, opaque)
            if method == "auto":
                tried.append((candidate, why))
                unsaveable = traced
                continue
            log.warning("%s: %s; plan.save() will fail -- partition with method='export' "
                        "(or the default method='auto') to write the plan", traced.model_name, why)
        if tried:
            log.info("traced %s with %s, since %s", traced.model_name, candidate,
                     "; ".join(f"{m}: {_headline(why)}" for m, why in tried))
        else:
            log.info("traced %s with %s", traced.model_name, candidate)
        return traced
    if unsaveable is not None:
        log.warning("traced %s with fx, though %s; the plan works in memory but plan.save() cannot "
                    "write its stages (export failed: %s)", unsaveable.model_name, tried[0][1],
                    "; ".join(_headline(why) for _, why in tried[1:]))
        return unsaveable
    eager()  # a model that fails on the example inputs is reported as such
    raise _Failed(tried)


def _opaque_reason(traced: TracedGraph, opaque: list[str]) -> str:
    gm = traced.graph_module
    shown = ", ".join(f"{p} ({type(gm.get_submodule(p)).__name__})" for p in opaque[:3])
    more = f" and {len(opaque) - 3} more" if len(opaque) > 3 else ""
    return (f"its graph keeps modules {shown}{more} opaque that neither fx nor torch.export can "
            "trace through, so its plan could not be written as stage code")


#: what torch says when a KV cache object is in the way
_KV_CACHE = re.compile(r"cache_utils|DynamicCache|past_key_values|\bCache\b")


def _trace_error(model: nn.Module, method: str, tried: list[tuple[str, str]], *,
                 kv_cache_off: bool = False) -> TraceError:
    """The TraceError of a model no method could trace: each method's full reason, and the fix."""
    reasons = "\n".join(f"  - {m}: {_indent(why)}" for m, why in tried)
    if any(_KV_CACHE.search(why) for _, why in tried):
        advice = ("the KV cache is in the way: pass use_cache=False -- set model.config.use_cache = False "
                  "(or build the model with use_cache=False in its config) -- and partition again")
    elif method in ("auto", "fx") and "export" not in {m for m, _ in tried}:
        advice = "mark the untraceable submodule as a leaf (leaf_modules=[MyBlock]) or pass method='export'"
    else:
        advice = ("make the control flow in forward independent of tensor values (torch.cond), "
                  "or mark the offending submodule as a leaf with method='fx', leaf_modules=[...]")
    note = (" (traced with use_cache=False too, since its config has use_cache=True)"
            if kv_cache_off else "")
    return TraceError(
        f"could not trace {type(model).__name__}{note}; tried {', '.join(m for m, _ in tried)}:\n"
        f"{reasons}\nTo fix: {advice}."
    )


def _kv_cache_configs(model: nn.Module) -> list[Any]:
    """The HF configs in ``model`` with ``use_cache=True`` (each once)."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None) is True:
            configs.setdefault(id(config), config)
    return list(configs.values())


@contextlib.contextmanager
def _kv_cache_off(configs: list[Any]) -> Iterator[None]:
    """``use_cache=False`` on each of ``configs`` for the duration (the user's config comes back)."""
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


# -- input handling ----------------------------------------------------------


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _message(exc: BaseException) -> str:
    """The exception's type and its whole text (a cut message hides the fix torch suggests)."""
    return f"{type(exc).__name__}: {str(exc).strip()}"


def _headline(text: str) -> str:
    """The first line of a reason, for one-line log messages (the error keeps it whole)."""
    return (text.strip().splitlines() or [""])[0]


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n    ")


def _has_lazy_parameters(model: nn.Module) -> bool:
    from torch.nn.parameter import is_lazy

    return any(is_lazy(t) for t in [*model.parameters(), *model.buffers()])


def _check_signature(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(
            f"example inputs do not match {type(model).__name__}.forward{sig}: {exc}; "
            f"found {len(args)} positional input(s) and keywords {sorted(kwargs)}. "
            "Pass example_inputs as a tuple of the positional arguments and example_kwargs "
            "as a dict of the keyword arguments forward expects"
        ) from None


def _run_eager(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return model(*args, **kwargs)
    except Exception as exc:
        raise TraceError(
            f"{type(model).__name__} fails on the example inputs, called eagerly (no tracing): "
            f"{_message(exc)}. It was called with {_describe_inputs(model, args, kwargs)}. "
            "Check that example_inputs (shapes, dtypes, device) are what forward expects "
            "(pipec.partition traces one micro-batch: dim 0 divided by num_microbatches)"
        ) from exc


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device.type}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:4])
        return f"({inner}{', ...' if len(value) > 4 else ''})"
    return type(value).__name__


def _describe_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """``x: float32[2, 7] on cpu, mask: None`` -- what forward was given."""
    try:
        names = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        names = [f"input {i}" for i in range(len(args))] + list(kwargs)
    values = list(args) + list(kwargs.values())
    if not values:
        return "no inputs"
    return ", ".join(f"{n}: {_describe(v)}" for n, v in zip(names, values))


def _check_output(method: str, got: Any, reference: Any) -> None:
    """TraceError unless the graph's output ``got`` matches the eager ``reference``."""
    ref_leaves = [x for x in pytree.tree_leaves(_plain(reference)) if isinstance(x, torch.Tensor)]
    got_leaves = [x for x in pytree.tree_leaves(_plain(got)) if isinstance(x, torch.Tensor)]
    if len(ref_leaves) != len(got_leaves):
        raise TraceError(
            f"the {method} graph returns {len(got_leaves)} tensors, the model {len(ref_leaves)}"
        )
    for i, (r, g) in enumerate(zip(ref_leaves, got_leaves)):
        if r.shape != g.shape or not torch.allclose(r.float(), g.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
            raise TraceError(
                f"the {method} graph's output {i} differs from the model's "
                f"(shape {tuple(g.shape)} vs {tuple(r.shape)})"
            )


def _plain(value: Any) -> Any:
    """HF ``ModelOutput`` and other mappings as plain dicts, for comparison."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value) if isinstance(value, list) else tuple(_plain(v) for v in value)
    return value


# -- capture -------------------------------------------------------------------


@dataclass(frozen=True)
class _Capture:
    """A captured graph before annotation, with its calling convention."""

    gm: fx.GraphModule
    method: str
    flat_inputs: tuple[Any, ...]
    flatten: Callable[[tuple[Any, ...], Mapping[str, Any]], tuple[Any, ...]]
    unflatten: Callable[[Any], Any]
    structure: InputStructure | None = None  # the same binding as data (saved with the plan)


# -- fx ------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[LeafSpec]) -> None:
        super().__init__()
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], leaves: Sequence[LeafSpec]) -> _Capture:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    # fx would bake the tensors inside a dict / list / tuple argument into the graph as
    # constants: the graph then ignores its inputs. torch.export takes such inputs apart.
    for name, value in bound.arguments.items():
        variadic_arg = sig.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if not variadic_arg and not isinstance(value, torch.Tensor) and any(
            isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)
        ):
            raise TraceError(
                f"input {name!r} is a {type(value).__name__} holding tensors, which fx would bake "
                "into the graph as constants; trace with method='export' (or the default 'auto')"
            )
    # Arguments that are not tensors (flags, None) are baked in as constants.
    concrete = {
        name: value
        for name, value in bound.arguments.items()
        if not isinstance(value, torch.Tensor)
        and sig.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # A ``*args`` / ``**kwargs`` of forward becomes a placeholder that a plain call
    # cannot fill positionally (HF models take ``**kwargs`` they pass down); one
    # no node reads is dropped, so the graph takes one value per named input.
    variadic = [n for n in gm.graph.nodes
                if n.op == "placeholder" and str(n.target).startswith("*") and not n.users]
    for node in variadic:
        gm.graph.erase_node(node)
    dropped = _drop_guarded_constants(gm.graph, concrete)
    if variadic or dropped:
        gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(n.target).lstrip("*") for n in placeholders]

    structure = _fx_structure(sig, placeholders, {n: concrete[n] for n in dropped})

    def flatten(a: tuple[Any, ...], kw: Mapping[str, Any]) -> tuple[Any, ...]:
        if structure is not None:  # the binding a loaded plan uses too
            values = flatten_call(a, kw, structure, ())
            unsaved = [n for n in dropped if n not in structure.constants]
        else:
            values, unsaved = None, dropped
        b = sig.bind(*a, **kw)
        b.apply_defaults()
        for name in unsaved:
            _check_constant(name, b.arguments.get(name), concrete[name])
        return values if values is not None else tuple(b.arguments.get(name) for name in names)

    return _Capture(gm, "fx", flatten(args, kwargs), flatten, lambda out: out, structure)


def _fx_structure(
    sig: inspect.Signature, placeholders: Sequence[fx.Node], guarded: Mapping[str, Any]
) -> InputStructure | None:
    """How fx's graph binds a call: forward's parameters, one per graph input; None
    when a graph input is a ``*args`` / ``**kwargs`` pack (bound as a whole in memory)."""
    if any(str(n.target).startswith("*") for n in placeholders):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    simple = (type(None), bool, int, float, str)
    constants = {n: v for n, v in guarded.items() if type(v) in simple}
    explicit = []
    for name, value in constants.items():
        default = sig.parameters[name].default
        same = default is value if value is None or isinstance(value, bool) else (
            type(default) is type(value) and bool(default == value))
        if not same:
            explicit.append(name)
    return InputStructure(
        parameters=tuple(n for n, p in sig.parameters.items() if p.kind not in variadic),
        var_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()),
        arguments=tuple(str(n.target) for n in placeholders),
        constants=constants,
        explicit=tuple(explicit),
    )


def _drop_guarded_constants(graph: fx.Graph, concrete: Mapping[str, Any]) -> list[str]:
    """Remove the placeholders fx keeps for ``concrete_args`` (``labels_1`` for an
    HF ``labels=None``) when only their guards read them; return the argument names.

    fx bakes a concrete argument's value into the graph and keeps a placeholder
    whose only readers are a guard (``_assert_is_none``, or ``==`` and
    ``torch._assert``) checking the call passes the same value. Left in, the plan
    asks every caller for ``labels_1``, ``return_dict_1`` ... that the model
    never reads; the guard moves to ``flatten`` (:func:`_check_constant`) instead.
    """
    dropped = []
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        name = str(node.target)
        if not (name.endswith("_1") and name[:-2] in concrete):
            continue
        guard: list[fx.Node] = []
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user not in guard:
                    guard.append(user)
                    frontier.append(user)
        if any(u.op == "output" for u in guard) or any(
            user not in guard for g in guard for user in g.users
        ):
            continue  # the value flows into the computation: keep it an input
        order = {n: i for i, n in enumerate(graph.nodes)}
        for g in sorted(guard, key=order.__getitem__, reverse=True):
            graph.erase_node(g)
        graph.erase_node(node)
        dropped.append(name[:-2])
    return dropped


def _check_constant(name: str, found: Any, traced: Any) -> None:
    """The guard fx would have run: a baked-in argument must be passed as traced."""
    if traced is None or isinstance(traced, bool):
        same = found is traced
    else:
        same = type(found) is type(traced) and bool(found == traced)
    if not same:
        raise TraceError(
            f"argument {name!r} was traced with the value {traced!r} and is baked into the "
            f"graph, but {found!r} was passed; partition again with example_kwargs="
            f"{{{name!r}: ...}} set as you will call the model"
        )


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
