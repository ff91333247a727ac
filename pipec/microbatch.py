"""Split a full batch into micro-batches and merge micro-batch outputs back.

Pure tensor bookkeeping, no communication: the runtime splits each step's
batch with it, and the partitioner the example batch it traces. Inputs are
split along dim 0 into ``num_microbatches`` equal chunks. A batch need not be
the size the plan was made for, nor have its other dimensions (a sequence
length): any batch whose dim 0 divides into ``num_microbatches`` equal parts
runs, with the plan's dtypes and numbers of dimensions
(:class:`pipec.plan.InputSpec`). :func:`step_shapes` is the step's
per-micro-batch input shapes, the key under which the runtime remembers the
boundary shapes they produce (:mod:`pipec.runtime.comm`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence, Set
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipec.errors import ConfigError
from pipec.plan import InputSpec
from pipec.types import InputStructure


def flatten_call(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], structure: InputStructure | None,
    specs: Sequence[InputSpec],
) -> tuple[Any, ...]:
    """One value per graph input (``specs``) from a call's ``(args, kwargs)``, bound
    as the trace bound the example (``structure``, saved in the plan data): the one
    binding of an in-memory plan, a loaded one and the traced graph itself.

    ``torch.export``: the call is flattened against the example's pytree spec (dict
    entries by key, in any order); fx: arguments bind to ``forward``'s parameters.
    Without a structure (a plan.json written before it was saved) inputs bind by
    graph-input name, :func:`bind_inputs`. Raises :class:`ConfigError` for a call
    that does not match.
    """
    if structure is None:
        return bind_inputs(args, kwargs, specs)
    if structure.in_spec is not None:
        return flatten_by_spec(args, kwargs, _spec(structure.in_spec))
    return _bind_parameters(args, kwargs, structure)


def call_of(
    values: Sequence[Any], structure: InputStructure | None, specs: Sequence[InputSpec]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inverse of :func:`flatten_call`: a call ``(args, kwargs)`` whose graph inputs
    are ``values`` (one per ``specs``), e.g. a random batch built from plan.json."""
    if len(values) != len(specs):
        raise ConfigError(f"expected {len(specs)} inputs {[s.name for s in specs]}, found {len(values)}")
    if structure is None:
        return tuple(values), {}
    if structure.in_spec is not None:
        args, kwargs = pytree.tree_unflatten(list(values), _spec(structure.in_spec))
        return tuple(args), dict(kwargs)
    kwargs = dict(zip(structure.arguments, values))
    kwargs.update({name: structure.constants[name] for name in structure.explicit})
    return (), kwargs


def flatten_by_spec(args: tuple[Any, ...], kwargs: Mapping[str, Any], spec: pytree.TreeSpec) -> tuple[Any, ...]:
    """The leaves of ``(args, kwargs)`` in the order of ``spec`` (the traced example's
    structure). Dict entries are matched by key, never by position."""
    tree = (tuple(args), dict(kwargs))
    try:
        leaves = spec.flatten_up_to(tree)
        # flatten_up_to accepts any value where the spec has a leaf: refuse a container there
        same = pytree.tree_structure(pytree.tree_unflatten(leaves, spec)) == spec
    except (ValueError, TypeError, KeyError, RuntimeError):
        same = False
    if not same:
        raise ConfigError(
            "inputs have a different structure than the example the plan was made with: expected "
            f"{_show(spec)}, found {_show(pytree.tree_structure(tree))}; pass the same positional "
            "arguments, keyword arguments and containers (dict keys may come in any order)"
        )
    return tuple(leaves)


@functools.lru_cache(maxsize=32)
def _spec(text: str) -> pytree.TreeSpec:
    try:
        return pytree.treespec_loads(text)
    except Exception as exc:
        raise ConfigError(
            f"the plan's input structure cannot be read ({exc}); import the module that registers "
            "its input types with torch's pytree before running the plan"
        ) from exc


def _show(spec: pytree.TreeSpec) -> str:
    """``((*, {'x': *, 'y': *}), {})`` -- a spec with its leaves as ``*``."""
    class _Leaf:
        def __repr__(self) -> str:
            return "*"
    return repr(pytree.tree_unflatten([_Leaf()] * spec.num_leaves, spec))


def _bind_parameters(args: tuple[Any, ...], kwargs: Mapping[str, Any], structure: InputStructure) -> tuple[Any, ...]:
    """fx: bind like ``inspect.signature(forward).bind`` and take each graph input's argument."""
    params = structure.parameters
    if len(args) > len(params):
        raise ConfigError(
            f"expected at most {len(params)} positional inputs {list(params)}, found {len(args)}"
        )
    given: dict[str, Any] = dict(zip(params, args))
    for name, value in kwargs.items():
        if name in given:
            raise ConfigError(f"input {name!r} is given twice, positionally and by keyword")
        if name not in params and not structure.var_keyword:
            raise ConfigError(f"unexpected keyword input {name!r}; the model's forward takes {list(params)}")
        given[name] = value
    for name, traced in structure.constants.items():
        if name in given:
            check_constant(name, given[name], traced)
        elif name in structure.explicit:
            raise ConfigError(
                f"argument {name!r} was traced with the value {traced!r} (not forward's default) and is "
                f"baked into the graph; pass {name}={traced!r}, or partition again without it"
            )
    missing = [a for a in structure.arguments if a not in given]
    if missing:
        raise ConfigError(
            f"missing input {missing[0]!r}: the plan's graph inputs are {list(structure.arguments)} "
            f"(forward's parameters {list(params)}); pass every one"
        )
    return tuple(given[a] for a in structure.arguments)


def check_constant(name: str, found: Any, traced: Any) -> None:
    """An argument fx baked into the graph must be passed as traced (the guard fx would
    have run: ``is`` for None and bools, same type and ``==`` otherwise)."""
    same = found is traced if traced is None or isinstance(traced, bool) else (
        type(found) is type(traced) and bool(found == traced))
    if not same:
        raise ConfigError(
            f"argument {name!r} was traced with the value {traced!r} and is baked into the "
            f"graph, but {found!r} was passed; partition again with example_kwargs="
            f"{{{name!r}: ...}} set as you will call the model"
        )


def chunk(value: torch.Tensor, num_microbatches: int) -> tuple[torch.Tensor, ...]:
    """The one rule of micro-batch splitting: dim 0 cut into ``num_microbatches``
    equal, contiguous parts, micro-batch ``m`` being rows ``[m b, (m + 1) b)``. The
    runtime splits each step's inputs and target with it, the partitioner the
    example batch it traces (so micro-batch 0 is the same rows in both)."""
    return tuple(value.chunk(num_microbatches, dim=0))


def bind_inputs(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], specs: Sequence[InputSpec]
) -> tuple[Any, ...]:
    """One value per graph input of a plan saved without its input structure:
    positional arguments first, then keyword arguments by graph-input name."""
    names = [s.name for s in specs]
    if len(args) > len(names):
        raise ConfigError(
            f"expected at most {len(names)} inputs {names}, found {len(args)} positional arguments"
        )
    values: list[Any] = list(args)
    unknown = sorted(set(kwargs) - set(names[len(args):]))
    if unknown:
        raise ConfigError(
            f"unexpected keyword inputs {unknown}; the plan's graph inputs are {names} "
            f"(the first {len(args)} given positionally)"
        )
    for name in names[len(args):]:
        if name not in kwargs:
            raise ConfigError(f"missing input {name!r}: the plan's graph inputs are {names}; pass every one")
        values.append(kwargs[name])
    return tuple(values)


def split_inputs(
    values: Sequence[Any],
    specs: Sequence[InputSpec],
    num_microbatches: int,
    device: torch.device,
    needed: Set[str] | None = None,
) -> list[dict[str, Any]]:
    """``result[m][name]`` is micro-batch ``m`` of graph input ``name``. Tensors are
    chunked along dim 0 and moved to ``device``; other values go to every micro-batch.
    Every input is checked; only those in ``needed`` (default: all) are kept.

    Raises :class:`ConfigError` for a tensor input whose dim 0 does not divide into
    ``num_microbatches`` equal parts (naming batch sizes that do), or whose dtype or
    number of dimensions differs from the plan's."""
    if len(values) != len(specs):
        raise ConfigError(
            f"expected {len(specs)} inputs {[s.name for s in specs]}, found {len(values)}"
        )
    out: list[dict[str, Any]] = [{} for _ in range(num_microbatches)]
    for spec, value in zip(specs, values):
        if spec.meta is None or not isinstance(value, torch.Tensor):
            if spec.meta is not None:
                raise ConfigError(
                    f"input {spec.name!r}: expected a tensor of micro-batch shape {spec.meta.shape}, "
                    f"found {type(value).__name__}"
                )
            for mb in out:
                mb[spec.name] = value
            continue
        want = spec.meta.shape
        if not want or value.dim() != len(want):
            full = (want[0] * num_microbatches, *want[1:]) if want else ()
            raise ConfigError(
                f"input {spec.name!r}: expected a batch of {len(full)} dimensions like {full} "
                f"({num_microbatches} micro-batches of {want}), found shape {tuple(value.shape)}; pass a batch "
                "with the plan's dimensions or re-plan with example inputs shaped like the real batch"
            )
        rows = value.shape[0]
        if rows == 0 or rows % num_microbatches:
            below = (rows // num_microbatches) * num_microbatches
            options = [n for n in (below, below + num_microbatches) if n > 0]
            raise ConfigError(
                f"input {spec.name!r}: a batch of {rows} along dim 0 does not split into {num_microbatches} "
                f"equal micro-batches; pass a batch size divisible by {num_microbatches} "
                f"(e.g. {' or '.join(map(str, options))}; the plan was made for {want[0] * num_microbatches})"
            )
        if value.dtype != spec.meta.torch_dtype:
            raise ConfigError(
                f"input {spec.name!r}: expected dtype {spec.meta.dtype}, found "
                f"{str(value.dtype).removeprefix('torch.')}; convert it with .to({spec.meta.dtype})"
            )
        if needed is None or spec.name in needed:
            for mb, part in zip(out, chunk(value.to(device), num_microbatches)):
                mb[spec.name] = part
    return out


def step_shapes(values: Sequence[Any], specs: Sequence[InputSpec], num_microbatches: int) -> tuple[Any, ...]:
    """Per graph input, the micro-batch shape of this step's tensor (None for a
    non-tensor input): the same on every rank, since every rank gets the full batch.
    Call after :func:`split_inputs` checked ``values``."""
    return tuple(
        (v.shape[0] // num_microbatches, *v.shape[1:]) if s.meta is not None and isinstance(v, torch.Tensor) else None
        for s, v in zip(specs, values)
    )


def plan_shapes(specs: Sequence[InputSpec]) -> tuple[Any, ...]:
    """:func:`step_shapes` of a batch shaped like the plan's example."""
    return tuple(tuple(s.meta.shape) if s.meta is not None else None for s in specs)


def split_target(target: Any, num_microbatches: int, device: torch.device | None) -> list[Any]:
    """Chunk every tensor of ``target`` (any pytree) along dim 0, moved to ``device``
    (None: where it is); other values go to every micro-batch."""
    leaves, spec = pytree.tree_flatten(target)
    chunks: list[list[Any]] = [[] for _ in range(num_microbatches)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] % num_microbatches:
                raise ConfigError(
                    f"target: expected a batch divisible into {num_microbatches} micro-batches along "
                    f"dim 0, found shape {tuple(leaf.shape)}; pass the target of the full batch"
                )
            for c, part in zip(chunks, chunk(leaf if device is None else leaf.to(device), num_microbatches)):
                c.append(part)
        else:
            for c in chunks:
                c.append(leaf)
    return [pytree.tree_unflatten(c, spec) for c in chunks]


def replica_share(value: Any, data_parallel: int, index: int) -> Any:
    """Replica ``index``'s share of a global batch for ``data_parallel`` replicas: every
    tensor of ``value`` (any pytree) with a dim 0 cut into ``data_parallel`` equal,
    contiguous parts by :func:`chunk` (replica ``d`` gets rows ``[d b, (d + 1) b)``, so
    global micro-batch ``d * M + m`` is replica ``d``'s micro-batch ``m``); other values
    go to every replica. What each rank of replica ``index`` passes to ``pipe.step``."""
    leaves, spec = pytree.tree_flatten(value)
    out: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] % data_parallel:
                raise ConfigError(
                    f"the global batch: expected dim 0 divisible by data_parallel={data_parallel}, found "
                    f"shape {tuple(leaf.shape)}; pass a global batch of a multiple of {data_parallel} samples"
                )
            out.append(chunk(leaf, data_parallel)[index])
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Concatenate micro-batch outputs along dim 0 leaf by leaf; a leaf that cannot
    be concatenated (a scalar, a non-tensor) becomes the list of its values."""
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    merged: list[Any] = []
    for i, first in enumerate(flat[0][0]):
        parts = [leaves[i] for leaves, _ in flat]
        if isinstance(first, torch.Tensor) and first.dim() > 0 and all(
            isinstance(p, torch.Tensor) and p.shape[1:] == first.shape[1:] for p in parts
        ):
            merged.append(torch.cat(parts, dim=0))
        else:
            merged.append(parts)
    return pytree.tree_unflatten(merged, spec)
