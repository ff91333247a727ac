"""Random operations seeded by (seed, step, micro-batch, node), whatever the stage layout.

Phase: split (the stage graphs call :func:`seeded`) and stage runtime (the
executor opens a :func:`random_scope` around each forward). Every random node
of a stage graph -- dropout, ``rand``, attention with dropout, found by
:func:`pipec.mode_ops.is_random` -- is wrapped as
``seeded("<node>", op, *args)``. Inside a scope, the op runs with the CPU
generator (and the CUDA generator of its device) seeded from
``(seed, step, microbatch, "<node>")``, then their states are put back, so

- a node draws the same numbers on whichever stage, rank or schedule it runs:
  a 2-stage and a 4-stage plan of one model train identically, and
  :func:`pipec.reference_step` reproduces them in one process;
- micro-batches and steps draw different numbers;
- the user's global random state is left as it was.

The node name is the one in the whole traced graph (for an fx ``call_module``
traced through at split time, ``<module node>/<inner node>``), which does not
depend on how the graph is cut. Outside a scope (a stage module called
directly) the op draws from the global generator, like the original model.
Random operations hidden in a module kept opaque are not seeded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class RandomScope:
    """What a random node's numbers are a function of, besides its name."""

    seed: int
    step: int
    microbatch: int


_SCOPE: ContextVar[RandomScope | None] = ContextVar("pipec_random_scope", default=None)


@contextlib.contextmanager
def random_scope(seed: int, step: int, microbatch: int) -> Iterator[RandomScope]:
    """Seed the random nodes of the stage modules called inside from
    ``(seed, step, microbatch, node name)``."""
    scope = RandomScope(int(seed), int(step), int(microbatch))
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def node_seed(scope: RandomScope, name: str) -> int:
    """The seed of node ``name`` in ``scope``: a hash, the same in every process
    (Python's ``hash`` of a string is not)."""
    text = f"{scope.seed}/{scope.step}/{scope.microbatch}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=256)
def _resolve(qualified: str) -> Any:
    """``"torch.nn.functional.dropout"`` -> the function (stage files name Python functions by text)."""
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ImportError(f"cannot import {qualified!r}")


def _generators(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Generator]:
    gens = [torch.default_generator]
    device = kwargs.get("device")
    if device is None:
        device = next((x.device for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)), None)
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        gens.append(torch.cuda.default_generators[torch.cuda.current_device() if index is None else index])
    return gens


def seeded(name: str, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``op(*args, **kwargs)`` -- an aten operator, or a function named by its
    qualified name -- seeded for node ``name`` in the current :func:`random_scope`."""
    fn = _resolve(op) if isinstance(op, str) else op
    scope = _SCOPE.get()
    if scope is None:
        return fn(*args, **kwargs)
    gens = _generators(args, kwargs)
    states = [g.get_state() for g in gens]
    seed = node_seed(scope, name)
    try:
        for g in gens:
            g.manual_seed(seed)
        return fn(*args, **kwargs)
    finally:
        for g, state in zip(gens, states):
            g.set_state(state)


__all__ = ["RandomScope", "node_seed", "random_scope", "seeded"]
