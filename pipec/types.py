"""Values passed between the phases: the traced graph and per-node costs.

Phase map (see ARCHITECTURE.md)::

    trace     -> TracedGraph   (this module's types)
    profile   -> Profile       (pipec.profile)  -> CostModel (pipec.costs)
    CostModel -> NodeCost per node (this module)

Everything here is immutable. Units: seconds (float) and bytes (int).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx


class FrozenModel(BaseModel):
    """Base of every pydantic value pipec saves to disk: immutable, strict keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_DTYPE_NAMES = frozenset({
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128", "uint8", "int8",
    "int16", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
})
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "complex64", "complex128"}

# -- mixed precision: the names partition(precision=...) takes --------------------
PRECISIONS = ("fp32", "bf16", "fp16")
_COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# the float dtypes that autocast computes in and boundaries cross in the compute dtype;
# float64 (and complex) stay as they are: autocast leaves them alone too
_CAST_DTYPES = frozenset({"float32", "bfloat16", "float16"})


def check_precision(precision: object) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else a PrecisionError listing them."""
    if isinstance(precision, str) and precision in PRECISIONS:
        return precision
    from pipec.errors import PrecisionError

    raise PrecisionError(
        f"precision: expected one of {', '.join(repr(p) for p in PRECISIONS)}, found {precision!r}; "
        "pass precision='bf16' (autocast to bfloat16, fp32 master weights), 'fp16' (float16 with "
        "dynamic loss scaling) or 'fp32' (the default)"
    )


def compute_dtype_name(precision: str) -> str:
    """The dtype (``"bfloat16"``...) that stages of ``precision`` compute matmuls in."""
    return _COMPUTE_DTYPES[check_precision(precision)]


def boundary_meta(meta: TensorMeta, precision: str) -> TensorMeta:
    """How a tensor of ``meta`` (traced in the model's own dtype) crosses stages under
    ``precision``: a float32/bfloat16/float16 tensor in the compute dtype (under bf16
    and fp16 half the bytes of float32), anything else unchanged."""
    dtype = compute_dtype_name(precision)
    if precision == "fp32" or meta.dtype not in _CAST_DTYPES or meta.dtype == dtype:
        return meta
    numel = 1
    for d in meta.shape:
        numel *= d
    return TensorMeta(shape=meta.shape, dtype=dtype, num_bytes=numel * getattr(torch, dtype).itemsize)



class TensorMeta(FrozenModel):
    """Shape, dtype (``str(torch.dtype)`` without ``torch.``) and size of one tensor."""

    shape: tuple[int, ...]
    dtype: str
    num_bytes: int

    @property
    def is_floating(self) -> bool:
        """Whether a gradient can flow through this tensor."""
        return self.dtype in _FLOAT_DTYPES or self.dtype.startswith("float")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype``; only real dtype names are looked up (plan.json is data)."""
        dtype = getattr(torch, self.dtype, None) if self.dtype in _DTYPE_NAMES else None
        if not isinstance(dtype, torch.dtype):
            from pipec.errors import PlanError

            raise PlanError(f"unknown tensor dtype {self.dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")
        return dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(
            shape=tuple(int(d) for d in tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            num_bytes=int(tensor.numel() * tensor.element_size()),
        )


#: a value fx baked into the graph that plan.json can hold, to check calls against
Constant = None | bool | int | float | str


class InputStructure(FrozenModel):
    """How a call's ``(args, kwargs)`` become the graph inputs, saved with the plan so a
    loaded plan binds a call exactly as the in-memory one (:func:`pipec.microbatch.flatten_call`).

    ``torch.export``: ``in_spec`` is the pytree spec of the example's ``(args, kwargs)``
    (``treespec_dumps``); the graph inputs are its leaves. fx: ``parameters`` are
    ``forward``'s named parameters in order (``var_keyword``: it also takes
    ``**kwargs``), ``arguments`` the parameter each graph input is, and
    ``constants`` the values baked in whose calls must match (``labels=None``),
    ``explicit`` those traced at a value other than forward's default (a call must pass them).
    """

    in_spec: str | None = None
    parameters: tuple[str, ...] = ()
    var_keyword: bool = False
    arguments: tuple[str, ...] = ()
    constants: dict[str, Constant] = {}
    explicit: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParamInfo:
    """One parameter or buffer of the original model, by canonical FQN.

    ``fqn`` is the name ``model.named_parameters()`` (or ``named_buffers()``)
    yields; ``aliases`` are other names of the same tensor (tied weights such as
    ``lm_head.weight`` for ``transformer.wte.weight``). ``users`` are the graph
    nodes that read it.
    """

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    num_bytes: int
    numel: int
    is_buffer: bool
    aliases: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    persistent: bool = True  # False for non-persistent buffers and plain tensor attributes


@dataclass(frozen=True)
class NodeInfo:
    """One fx node with what the later phases need to know about it."""

    name: str
    op: str  # placeholder | get_attr | call_module | call_function | call_method | output
    target: str
    inputs: tuple[str, ...]  # names of the nodes whose values it reads
    users: tuple[str, ...]  # names of the nodes that read its value
    outputs: tuple[TensorMeta, ...]  # one per tensor in its (possibly nested) value
    module_path: str  # owning module, e.g. "layers.3.mlp"; "" for the root
    params: tuple[str, ...]  # canonical FQNs of parameters/buffers it reads
    param_bytes: int
    is_tensor: bool = True  # its value is one plain tensor (only such values may cross stages)
    # its value is a size computed from the model inputs' shapes alone (torch.export's
    # ``sym_size`` and the arithmetic on it): never sent, each stage that reads it recomputes it
    is_size: bool = False

    @property
    def output_bytes(self) -> int:
        return sum(t.num_bytes for t in self.outputs)


@dataclass(frozen=True)
class TracedGraph:
    """Phase 1 output: the model as an fx graph, annotated.

    ``graph_module(*flat_inputs)`` -- called with one value per placeholder, in
    order -- reproduces the model's forward; :meth:`flatten_inputs` builds those
    values from the user's ``(args, kwargs)`` and :meth:`unflatten_output`
    restores the model's output structure from the graph's flat output.
    """

    graph_module: fx.GraphModule
    method: str  # "fx" or "export"
    nodes: tuple[NodeInfo, ...]  # every node, topological order
    params: Mapping[str, ParamInfo]  # canonical FQN -> info (parameters and buffers)
    input_names: tuple[str, ...]  # placeholder node names, in call order
    example_inputs: tuple[Any, ...]  # one value per placeholder
    model_name: str
    _flatten: Callable[[tuple[Any, ...], Mapping[str, Any]], tuple[Any, ...]] = field(repr=False)
    _unflatten: Callable[[Any], Any] = field(repr=False)
    training: bool = True  # the model's train/eval mode when it was traced
    module_modes: Mapping[str, bool] = field(default_factory=dict, repr=False)  # path -> training, at trace
    input_structure: InputStructure | None = None  # how calls bind to the inputs (None: not saveable)

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        """The user's call arguments as one value per placeholder."""
        return self._flatten(args, kwargs or {})

    def unflatten_output(self, flat: Any) -> Any:
        """The graph module's output in the original model's output structure."""
        return self._unflatten(flat)

    @property
    def param_bytes(self) -> int:
        return sum(p.num_bytes for p in self.params.values() if not p.is_buffer)


class NodeCost(FrozenModel):
    """What one node costs, per micro-batch. ``derived`` marks an I/W split made by rule."""

    forward_time: float
    input_grad_time: float
    weight_grad_time: float
    saved_bytes: int = 0  # activation bytes kept for backward
    output_bytes: int = 0
    param_bytes: int = 0
    derived: bool = False

    @property
    def backward_time(self) -> float:
        return self.input_grad_time + self.weight_grad_time

    @property
    def total_time(self) -> float:
        return self.forward_time + self.backward_time


class RuntimeOverhead(FrozenModel):
    """What the stage runtime spends beyond the compute and the transfers, in seconds.

    Phase: cost model (carried by a hardware file, ``runtime_overhead``; copied into
    the plan; added by the simulator). A profile times the stage's ops; the
    runtime's executor also pays, per action, its own Python dispatch, the
    autograd engine's set-up of a backward (``torch.autograd.backward`` /
    ``grad`` and the I/W split's bookkeeping), the random scope of a forward,
    detaching boundary leaves, and for a ``SEND`` / ``RECV`` posting and
    completing a request and copying the buffer. Per step it pays splitting the
    batch, posting the receives and, at the end, waiting for its last sends and
    recording the timeline. ``pipec calibrate`` measures these by running the
    runtime on a tiny two-stage model (:mod:`pipec.runtime.overhead_bench`).

    ``forward``, ``backward`` (a full ``B``), ``input_grad`` (``I``) and
    ``weight_grad`` (``W``) are added to every such action's duration; ``send``
    to every ``SEND_F`` / ``SEND_B``; ``recv`` to every ``RECV_F`` / ``RECV_B``
    after its messages arrived; ``step`` once to the step time. ``split_per_param_node``:
    seconds per node with parameters (a weight gradient) of a stage whose
    backward runs split into ``I`` and ``W`` (a zero-bubble schedule), added to
    its ``W`` -- the split captures the gradients where the input side of the
    autograd graph meets the parameters' side and runs the weights' backward
    from there, a cost that grows with the stage's parameterised ops; the first
    stage has none (its ``W`` is a plain backward).
    """

    forward: float = Field(default=0.0, ge=0)
    backward: float = Field(default=0.0, ge=0)
    input_grad: float = Field(default=0.0, ge=0)
    weight_grad: float = Field(default=0.0, ge=0)
    send: float = Field(default=0.0, ge=0)
    recv: float = Field(default=0.0, ge=0)
    step: float = Field(default=0.0, ge=0)
    split_per_param_node: float = Field(default=0.0, ge=0)

    def of_kind(self, kind: str) -> float:
        """Seconds added to one action of ``kind`` (``"F"``, ``"B"``, ``"I"``, ``"W"``,
        ``"SEND_F"``, ``"RECV_B"``, ...); 0 for a kind it does not name."""
        if kind.startswith("SEND"):
            return self.send
        if kind.startswith("RECV"):
            return self.recv
        return {"F": self.forward, "B": self.backward, "I": self.input_grad, "W": self.weight_grad}.get(kind, 0.0)


@runtime_checkable
class CostModel(Protocol):
    """Anything that can cost a traced graph's nodes and a transfer between ranks.

    Implemented by :class:`pipec.costs.ProfiledCostModel` (measured) and
    :class:`pipec.costs.AnalyticCostModel` (roofline from ``cost_models/*.json``).
    Both also have ``allreduce_time(num_bytes, ranks) -> seconds`` (the
    tied-gradient exchange); a cost model without it gets a ring all-reduce
    built from ``comm_time``.
    """

    @property
    def name(self) -> str: ...

    @property
    def memory_capacity(self) -> int | None:
        """Bytes of memory per device, or None when unknown (no default limit)."""
        ...

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        """Cost of every node of ``traced`` (placeholders/outputs cost zero)."""
        ...

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        """Seconds to move ``num_bytes`` from ``src_rank`` to ``dst_rank``."""
        ...
