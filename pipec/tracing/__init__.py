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
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pipec._preserve import preserved
from pipec.errors import ConfigError, TraceError
from pipec.inlining import opaque_modules
from pipec.tracing.annotate import _annotate
from pipec.tracing.capture import LeafSpec, _headline, _message
from pipec.tracing.export_capture import _quiet_torch_export, _trace_export
from pipec.tracing.fx_capture import _trace_fx
from pipec.types import TracedGraph

log = logging.getLogger(__name__)

METHODS = ("auto", "fx", "export")



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


