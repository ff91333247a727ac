"""The stage-module classes: the contract base and the in-memory graph stage.

Phase: split. :class:`StageModule` carries the contract described in
:mod:`pipec.split`; :class:`GraphStage` is a stage built in memory from the
traced graph; generated ``stage_<k>.py`` classes subclass :class:`StageModule`
directly. :func:`rebuild_output` restores the model's output structure and is
called from stage graphs.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


class StageModule(nn.Module):
    """Base of every stage module, in memory (:class:`GraphStage`) or generated
    (``stage_<k>.py``). The attributes are the contract in the module docstring."""

    index: int = 0
    input_names: tuple[str, ...] = ()
    graph_input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    is_last: bool = False
    requires_grad: Mapping[str, bool] = {}
    output_spec: str | None = None
    aliases: Mapping[str, tuple[str, ...]] = {}

    @property
    def boundary_input_names(self) -> tuple[str, ...]:
        """The inputs that come from other stages (``input_names`` past the model inputs)."""
        return self.input_names[len(self.graph_input_names):]

    def extra_repr(self) -> str:
        return f"index={self.index}, inputs={list(self.input_names)}, outputs={list(self.output_names)}"


class GraphStage(fx.GraphModule, StageModule):
    """A stage built in memory from the traced graph: an ``fx.GraphModule``
    whose tensors sit at their canonical FQNs."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor | nn.Module],
        graph: fx.Graph,
        *,
        index: int,
        graph_input_names: tuple[str, ...],
        boundary_input_names: tuple[str, ...],
        output_names: tuple[str, ...],
        is_last: bool,
        requires_grad: Mapping[str, bool],
        output_spec: str | None,
        aliases: Mapping[str, tuple[str, ...]],
        non_persistent: Iterable[str] = (),
        class_name: str = "Stage",
    ) -> None:
        super().__init__(dict(tensors), graph, class_name)
        for fqn in non_persistent:
            owner, _, field = fqn.rpartition(".")
            self.get_submodule(owner)._non_persistent_buffers_set.add(field)
        self.index = index
        self.graph_input_names = graph_input_names
        self.input_names = graph_input_names + boundary_input_names
        self.output_names = output_names
        self.is_last = is_last
        self.requires_grad = dict(requires_grad)
        self.output_spec = output_spec
        self.aliases = dict(aliases)

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphStage:
        # fx's own deepcopy would drop the contract attributes and non-persistent flags
        targets = dict.fromkeys(str(n.target) for n in self.graph.nodes if n.op in ("get_attr", "call_module"))
        persistent = set(self.state_dict(keep_vars=True))
        return GraphStage(
            {t: copy.deepcopy(fetch_attr(self, t), memo) for t in targets},
            copy.deepcopy(self.graph, memo),
            index=self.index,
            graph_input_names=self.graph_input_names,
            boundary_input_names=self.boundary_input_names,
            output_names=self.output_names,
            is_last=self.is_last,
            requires_grad=self.requires_grad,
            output_spec=self.output_spec,
            aliases=self.aliases,
            non_persistent=[n for n, _ in self.named_buffers() if n not in persistent],
            class_name=type(self).__name__,
        )


def place_tensor(module: nn.Module, fqn: str, tensor: torch.Tensor, *, persistent: bool = True) -> None:
    """Register ``tensor`` (a Parameter, else a buffer) at dotted ``fqn`` under
    ``module``, creating empty ``nn.Module`` containers on the way."""
    *path, field = fqn.split(".")
    owner = module
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(field, tensor)
    else:
        owner.register_buffer(field, tensor, persistent=persistent)


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute at dotted ``target`` under ``root``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


# -- the model output's structure ------------------------------------------------------


def rebuild_output(spec: str | None, plain_spec: str | None, leaves: Iterable[Any]) -> Any:
    """The model's output rebuilt from its flat ``leaves`` (called by stage graphs).

    ``spec`` restores the original types (e.g. a HF ``ModelOutput``, importing
    its module on demand); when it cannot be read, ``plain_spec`` restores the
    same structure as dicts, lists and tuples.
    """
    values = list(leaves)
    for text in (spec, plain_spec):
        treespec = _load_spec(text) if text is not None else None
        if treespec is not None:
            return pytree.tree_unflatten(values, treespec)
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _load_spec(text: str) -> pytree.TreeSpec | None:
    try:
        return pytree.treespec_loads(text)
    except Exception:  # noqa: S110  an unregistered type: import the module that registers it
        pass
    try:
        names = _spec_type_names(json.loads(text))
    except ValueError:
        return None
    for name in names:
        module = name.rpartition(".")[0]
        if module:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
    try:
        return pytree.treespec_loads(text)
    except Exception:
        log.info("output spec types cannot be rebuilt; returning plain containers")
        return None


def _spec_type_names(node: Any) -> list[str]:
    names: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            names.append(node["type"])
        for child in node.get("children_spec", ()):
            names += _spec_type_names(child)
    elif isinstance(node, list):
        for child in node:
            names += _spec_type_names(child)
    return names
