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
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pipec.mode_ops import describe_nodes

log = logging.getLogger(__name__)

MODE_ATTR = "training"  # what mode-following stage graphs read (pipec.split.modes)


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
    traced_training: bool = True
    follows_mode: bool = False
    mode_blind_random: Mapping[str, str] = {}

    def train(self, mode: bool = True) -> StageModule:
        """As ``nn.Module.train``; a stage traced in eval mode warns when switched to
        training (what Python skipped in eval, e.g. attention dropout, is not in its graph),
        one traced in training mode with random nodes that draw in eval too
        (:attr:`mode_blind_random`) when switched to eval."""
        if not mode and self.traced_training and self.mode_blind_random:
            warnings.warn(
                f"stage {self.index} still draws random numbers in eval(): its random operation(s) "
                f"{describe_nodes(dict(self.mode_blind_random))} were traced in train() mode and have no "
                "train/eval argument to follow. If the model's Python skips them in eval (stochastic "
                "depth: DropPath, StochasticDepth, `if not self.training: return x`), this stage's "
                "eval output is random. For inference, partition the model in eval mode: "
                "pipec.partition(model.eval(), ...).",
                UserWarning, stacklevel=2,
            )
        if mode and not self.traced_training and self.follows_mode:
            warnings.warn(
                f"stage {self.index} was traced from a model in eval() mode; in training it runs "
                "the dropout and batch norm its graph has, but not what the model's Python code "
                "skips in eval (e.g. attention dropout written as `p if self.training else 0`). "
                "Partition the model in train() mode to train it.",
                UserWarning, stacklevel=2,
            )
        return super().train(mode)

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
        traced_training: bool = True,
        follows_mode: bool = False,
        mode_blind_random: Mapping[str, str] | None = None,
    ) -> None:
        root: dict[str, Any] = dict(tensors)
        if follows_mode:
            root[MODE_ATTR] = traced_training  # read by the graph's get_attr node
        super().__init__(root, graph, class_name)
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
        self.traced_training = traced_training
        self.follows_mode = follows_mode
        self.mode_blind_random = dict(mode_blind_random or {})
        nn.Module.train(self, traced_training)  # starts in the mode the model was traced in

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphStage:
        # fx's own deepcopy would drop the contract attributes and non-persistent flags
        targets = dict.fromkeys(str(n.target) for n in self.graph.nodes
                                if n.op in ("get_attr", "call_module") and n.target != MODE_ATTR)
        persistent = set(self.state_dict(keep_vars=True))
        copied = GraphStage(
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
            traced_training=self.traced_training,
            follows_mode=self.follows_mode,
            mode_blind_random=self.mode_blind_random,
        )
        nn.Module.train(copied, self.training)
        return copied


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
