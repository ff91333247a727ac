"""The partition plan as data: what the partitioner decided, saved as ``plan.json``.

Layer: saved data (imports only basic values and the schedule IR). :class:`PlanData`
is the frozen pydantic value written as ``plan.json``; the user-facing
:class:`pipec.Plan` (:mod:`pipec.facade`) wraps it with what lives only in
memory (the traced graph, the loss function) and one method per phase, each a
function over this data:

- ``pipec.partition``  builds it          (pipec/partitioner/)
- ``plan.simulate()``                      (pipec/schedule/simulator.py)
- ``plan.stage_module(i)``                 (pipec/split/, or the plan directory)
- ``plan.save(dir)`` / ``pipec.load(dir)`` (pipec/codegen.py)
- ``plan.summary()``                       (pipec/summary.py)

:class:`PlanLike` is what functions below the façade may read of a user's
plan object when their public signature takes one (``merge_state_dicts(...,
plan=)``); it is a structural type, so they never import the façade.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from pydantic import field_validator, model_validator
from torch import nn

from pipec.schedule.ir import Schedule
from pipec.types import (
    FrozenModel,
    InputStructure,
    NodeCost,
    RuntimeOverhead,
    TensorMeta,
    TracedGraph,
    check_precision,
)

FORMAT_VERSION = 1

#: the DeviceMesh dimension orders a plan may name (:attr:`PlanData.mesh_order`; what each
#: means: :mod:`pipec.schedule.mesh`)
MeshOrder = tuple[str, str]
DP_PP: MeshOrder = ("dp", "pp")
PP_DP: MeshOrder = ("pp", "dp")
MESH_ORDERS: tuple[MeshOrder, ...] = (DP_PP, PP_DP)


class StageInfo(FrozenModel):
    """One pipeline stage. Times are per micro-batch on the stage's own device
    (already divided by its rank's relative speed); ``comm_time`` is the time
    its incoming and outgoing boundary transfers cost it; ``tied_time`` is its
    share per micro-batch of the tied-gradient all-reduces it joins once per
    step (what the partitioner charges; the simulator runs the all-reduce at
    the end of the step, :attr:`TiedGroup.allreduce_time`). ``input_grad_time``
    and ``weight_grad_time`` split ``backward_time`` into its I and W parts (None
    in plans saved before they were stored: the simulator splits it in
    proportion to the nodes' costs). ``dp_allreduce_time`` is, with
    ``data_parallel > 1``, the seconds of this stage's gradient all-reduce across
    the replicas, once per step, from its last backward on (0 with one replica;
    :mod:`pipec.partitioner.hybrid`)."""

    index: int
    rank: int
    nodes: tuple[str, ...]  # compute nodes in topological order (no placeholders)
    num_params: int
    param_bytes: int
    forward_time: float
    backward_time: float
    comm_time: float
    memory_bytes: int
    first_module: str = ""
    last_module: str = ""
    tied_time: float = 0.0
    input_grad_time: float | None = None
    weight_grad_time: float | None = None
    dp_allreduce_time: float = 0.0  # seconds: this stage's gradient all-reduce across the replicas
    # activation recompute policy (pipec.costs.recompute): "none" | "selective" | "full";
    # forward/backward times include what it adds ("none" in plans saved before it existed)
    recompute: str = "none"
    recompute_time: float = 0.0  # seconds per micro-batch of backward_time spent recomputing
    # activation bytes one micro-batch in flight keeps under ``recompute`` (None: every
    # node's saved bytes, as in plans saved before it was stored)
    kept_bytes: int | None = None
    # peak bytes when the pipeline runs on Gloo, whose sends complete only once waited
    # for: the runtime holds every tensor it sends until the step ends
    # (pipec.partitioner.assemble.gloo_extra_bytes); ``memory_bytes`` is NCCL's. None: as
    # memory_bytes (plans saved before it was stored, one-rank plans)
    gloo_memory_bytes: int | None = None

    def memory_on(self, backend: str | None) -> int:
        """Predicted peak bytes of this stage under ``backend`` (a ``torch.distributed``
        backend name; anything without "nccl" in it runs Gloo's way, as the runtime does)."""
        if (backend is not None and "nccl" in backend.lower()) or self.gloo_memory_bytes is None:
            return self.memory_bytes
        return self.gloo_memory_bytes

    @property
    def time(self) -> float:
        """The stage's time per micro-batch as the partitioner counts it."""
        return self.forward_time + self.backward_time + self.comm_time + self.tied_time


class Boundary(FrozenModel):
    """A tensor that crosses stages: produced by ``producer_stage`` (the fx node
    ``name``), read directly by each of ``consumer_stages`` (no relay).
    Shape and size are per micro-batch. ``transfer_times[i]`` is the seconds one
    micro-batch's tensor takes to reach ``consumer_stages[i]`` over the link
    between their ranks (0 on the same rank) -- and its gradient to come back,
    when it has one (:attr:`is_floating`); the simulator charges each message
    this once. Empty in plans saved before it was stored."""

    name: str
    producer_stage: int
    consumer_stages: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    num_bytes: int
    transfer_times: tuple[float, ...] = ()

    @property
    def is_floating(self) -> bool:
        """Whether a gradient flows back through this tensor."""
        return self.meta.is_floating

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(shape=self.shape, dtype=self.dtype, num_bytes=self.num_bytes)


def holder_ranks(stages: Iterable[int], rank_of: Callable[[int], int]) -> tuple[int, ...]:
    """The ranks that hold ``stages``, ascending, each once: the ranks that join a
    tied group's gradient all-reduce (the one rule the partitioner, the simulator
    and the runtime share; ``rank_of`` is the schedule's placement)."""
    return tuple(sorted({rank_of(s) for s in stages}))


class TiedGroup(FrozenModel):
    """A parameter used by several stages (tied embeddings): it lives on each,
    under its canonical FQN, and the runtime sums its gradient across them
    after each step: one all-reduce among the holders' ranks, which the cost
    model puts at ``allreduce_time`` seconds (None in plans saved before pipec
    priced it: not simulated, shown as not priced)."""

    fqn: str
    aliases: tuple[str, ...] = ()
    stages: tuple[int, ...]
    num_bytes: int
    allreduce_time: float | None = None

    def ranks(self, rank_of: Callable[[int], int]) -> tuple[int, ...]:
        """The ranks that join this group's all-reduce (:func:`holder_ranks`)."""
        return holder_ranks(self.stages, rank_of)


class InputSpec(FrozenModel):
    """One graph input (placeholder) as the stages see it, per micro-batch."""

    name: str
    meta: TensorMeta | None  # None for a non-tensor input


class Candidate(FrozenModel):
    """One configuration the auto-planner tried (which one it chose is
    :attr:`PlanData.chosen`, not a field here). With ``data_parallel="auto"`` it
    is one (D, P, v, M, schedule, mesh order): ``num_ranks`` is P (0 where not
    recorded: the plan's own) and ``dp_allreduce_time`` the slowest stage's
    gradient all-reduce across the D replicas."""

    schedule: str
    num_microbatches: int
    stages_per_rank: int
    step_time: float
    bubble_fraction: float
    peak_memory: tuple[int, ...]
    fits: bool
    note: str = ""
    data_parallel: int = 1
    num_ranks: int = 0
    mesh_order: tuple[str, str] = ("dp", "pp")
    dp_allreduce_time: float = 0.0


class PlanData(FrozenModel):
    """Everything ``plan.json`` holds. ``format_version`` guards loading."""

    format_version: int = FORMAT_VERSION
    model_name: str
    trace_method: str
    num_stages: int
    num_ranks: int
    # D replicas of the pipeline: the world is data_parallel * num_ranks ranks, each replica
    # taking batch_size / D of the global batch, placed by mesh_order, the DeviceMesh's
    # dimension order (pipec.schedule.mesh: ("dp", "pp") = a pipeline's ranks adjacent,
    # global rank = dp * num_ranks + pp; ("pp", "dp") = a stage's replicas adjacent, global
    # rank = pp * D + dp) on nodes of devices_per_node ranks. Plans saved before: D = 1.
    data_parallel: int = 1
    mesh_order: tuple[str, str] = ("dp", "pp")
    devices_per_node: int | None = None
    stages_per_rank: int
    num_microbatches: int
    batch_size: int | None = None  # full batch along dim 0, when known
    strategy: str
    cost_model: str
    schedule: Schedule  # compute actions only
    # the schedule lowered once per backend when the plan was made ("gloo", "nccl";
    # pipec.schedule.backends): what runs, is simulated, saved and drawn. Empty in
    # plans saved before it was stored (then lowered on use, by the same policy).
    lowered: dict[str, Schedule] = {}
    stages: tuple[StageInfo, ...]
    boundaries: tuple[Boundary, ...]
    node_costs: dict[str, NodeCost]  # topological order; the costs the partitioner used
    tied_groups: tuple[TiedGroup, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    input_structure: InputStructure | None = None  # how a call binds to ``inputs`` (None: by name)
    memory_limit: tuple[int | None, ...] = ()  # per rank
    device_speeds: tuple[float, ...] = ()  # per rank
    optimizer_state_bytes_per_param: int = 8
    # "fp32" | "bf16" | "fp16" (pipec.types.PRECISIONS): the stages' autocast dtype; float
    # boundaries cross in it. Plans saved before it was stored are fp32.
    precision: str = "fp32"
    recompute: str = "none"  # what partition(recompute=...) asked for; the stages hold the choice
    # 1: ZeRO-1, the optimizer state sharded over the data_parallel replicas: the stages'
    # memory counts a 1/D share of it, and the runtime shards by default (pipec.runtime.zero)
    zero: int = 0
    bottleneck: float  # slowest stage time
    lower_bound: float  # max(total / num_stages, largest node): compute only, no communication
    candidates: tuple[Candidate, ...] = ()
    # index in ``candidates`` of the configuration this plan is: the one fact the
    # summary and the report read (None when there are no candidates)
    chosen: int | None = None
    node_modules: dict[str, str] = {}  # compute node -> owning module path (for pictures after load)
    factory: str | None = None  # "FILE.py:FACTORY" the CLI built the model from
    batch_norm_layers: tuple[str, ...] = ()  # normalised per micro-batch (see pipec.mode_ops)
    # traced in train(), the model not random in eval(): random nodes with no mode argument
    # (node -> module path), which the stages draw in eval() too (pipec.mode_ops.mode_blind_random)
    mode_blind_random: dict[str, str] = {}
    # the cost model's runtime overhead per action and step (its hardware file's
    # ``runtime_overhead``), which the simulator adds; None in plans made before it
    # was measured, or with a cost model without one
    runtime_overhead: RuntimeOverhead | None = None

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        return check_precision(value)

    @model_validator(mode="before")
    @classmethod
    def _chosen_of_older_plans(cls, values: Any) -> Any:
        # plans saved before ``chosen`` was stored list the winner first (the
        # auto-planner has ranked its candidates that way since it was written)
        if isinstance(values, dict) and values.get("candidates") and values.get("chosen") is None:
            return {**values, "chosen": 0}
        return values

    @model_validator(mode="after")
    def _check_data_parallel(self) -> PlanData:
        if self.data_parallel < 1:
            raise ValueError(f"data_parallel: expected >= 1, found {self.data_parallel}")
        if self.mesh_order not in MESH_ORDERS:
            raise ValueError(f"mesh_order: expected one of {MESH_ORDERS}, found {self.mesh_order}")
        return self

    @property
    def world_size(self) -> int:
        """The processes the plan runs on: ``data_parallel * num_ranks``."""
        return self.data_parallel * self.num_ranks

    @property
    def chosen_candidate(self) -> Candidate | None:
        """The candidate this plan is (``candidates[chosen]``), None for a plan
        that was not auto-planned."""
        if self.chosen is None or not 0 <= self.chosen < len(self.candidates):
            return None
        return self.candidates[self.chosen]


class PlanLike(Protocol):
    """The parts of a user's plan (:class:`pipec.Plan`) that functions below the
    façade read when they are handed one: its data, its traced graph (None after
    ``pipec.load``), the directory it was loaded from, and its stage modules."""

    @property
    def data(self) -> PlanData: ...

    @property
    def traced(self) -> TracedGraph | None: ...

    @property
    def directory(self) -> Path | None: ...

    def stage_module(self, index: int) -> nn.Module: ...
