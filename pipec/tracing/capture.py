"""What a capture method returns: a graph before annotation, with its calling convention.

Phase 1, trace (see :mod:`pipec.tracing`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.errors import TraceError
from pipec.types import InputStructure

LeafSpec = type[nn.Module] | str


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




def _plain(value: Any) -> Any:
    """HF ``ModelOutput`` and other mappings as plain dicts, for comparison."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value) if isinstance(value, list) else tuple(_plain(v) for v in value)
    return value


def _message(exc: BaseException) -> str:
    """The exception's type and its whole text (a cut message hides the fix torch suggests)."""
    return f"{type(exc).__name__}: {str(exc).strip()}"


def _headline(text: str) -> str:
    """The first line of a reason, for one-line log messages (the error keeps it whole)."""
    return (text.strip().splitlines() or [""])[0]


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
