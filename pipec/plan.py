"""The partition plan: what the partitioner decided, as data that is saved to disk.

:class:`PlanData` is the frozen pydantic value written as ``plan.json``;
:class:`Plan` wraps it with what lives only in memory (the traced graph, the
loss function) and the user-facing methods. The phases that produce and use a
plan each own one method:

- ``pipec.partition``  builds it          (pipec/partitioner/)
- ``plan.schedule`` / ``plan.simulate()`` (pipec/schedule/)
- ``plan.stage_module(i)``                 (pipec/split/)
- ``plan.save(dir)`` / ``pipec.load(dir)`` (pipec/codegen.py)
- ``plan.summary()``                       (pipec/summary.py)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pipec.schedule.ir import Schedule
from pipec.types import FrozenModel, NodeCost, TensorMeta, TracedGraph

if TYPE_CHECKING:
    from pipec.schedule.simulator import Simulation

FORMAT_VERSION = 1


class StageInfo(FrozenModel):
    """One pipeline stage. Times are per micro-batch on the stage's own device
    (already divided by its rank's relative speed); ``comm_time`` is the time
    its incoming and outgoing boundary transfers cost it; ``tied_time`` is its
    share per micro-batch of the tied-gradient all-reduces it joins once per
    step (what the partitioner charges; the simulator runs the all-reduce at
    the end of the step, :attr:`TiedGroup.allreduce_time`)."""

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

    @property
    def time(self) -> float:
        """The stage's time per micro-batch as the partitioner counts it."""
        return self.forward_time + self.backward_time + self.comm_time + self.tied_time


class Boundary(FrozenModel):
    """A tensor that crosses stages: produced by ``producer_stage`` (the fx node
    ``name``), read directly by each of ``consumer_stages`` (no relay).
    Shape and size are per micro-batch."""

    name: str
    producer_stage: int
    consumer_stages: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    num_bytes: int

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(shape=self.shape, dtype=self.dtype, num_bytes=self.num_bytes)


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


class InputSpec(FrozenModel):
    """One graph input (placeholder) as the stages see it, per micro-batch."""

    name: str
    meta: TensorMeta | None  # None for a non-tensor input


class Candidate(FrozenModel):
    """One configuration the auto-planner tried."""

    schedule: str
    num_microbatches: int
    stages_per_rank: int
    step_time: float
    bubble_fraction: float
    peak_memory: tuple[int, ...]
    fits: bool
    note: str = ""


class PlanData(FrozenModel):
    """Everything ``plan.json`` holds. ``format_version`` guards loading."""

    format_version: int = FORMAT_VERSION
    model_name: str
    trace_method: str
    num_stages: int
    num_ranks: int
    stages_per_rank: int
    num_microbatches: int
    batch_size: int | None = None  # full batch along dim 0, when known
    strategy: str
    cost_model: str
    schedule: Schedule  # compute actions only; lowered on demand
    stages: tuple[StageInfo, ...]
    boundaries: tuple[Boundary, ...]
    node_costs: dict[str, NodeCost]  # topological order; the costs the partitioner used
    tied_groups: tuple[TiedGroup, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    memory_limit: tuple[int | None, ...] = ()  # per rank
    device_speeds: tuple[float, ...] = ()  # per rank
    optimizer_state_bytes_per_param: int = 8
    bottleneck: float  # slowest stage time
    lower_bound: float  # max(total / num_stages, largest node): compute only, no communication
    candidates: tuple[Candidate, ...] = ()
    node_modules: dict[str, str] = {}  # compute node -> owning module path (for pictures after load)
    factory: str | None = None  # "FILE.py:FACTORY" the CLI built the model from
    batch_norm_layers: tuple[str, ...] = ()  # normalised per micro-batch (see pipec.mode_ops)


class Plan:
    """A pipeline plan: :class:`PlanData` plus what lives in memory only."""

    def __init__(
        self,
        data: PlanData,
        *,
        traced: TracedGraph | None = None,
        loss_fn: Callable[..., Any] | None = None,
        directory: Path | None = None,
    ) -> None:
        self.data = data
        self.traced = traced
        self.loss_fn = loss_fn
        self.directory = directory
        self._stage_modules: dict[int, nn.Module] = {}

    # -- data views -----------------------------------------------------
    @property
    def stages(self) -> list[StageInfo]:
        return list(self.data.stages)

    @property
    def boundaries(self) -> list[Boundary]:
        return list(self.data.boundaries)

    @property
    def node_costs(self) -> dict[str, NodeCost]:
        return dict(self.data.node_costs)

    @property
    def schedule(self) -> Schedule:
        return self.data.schedule

    @property
    def num_stages(self) -> int:
        return self.data.num_stages

    @property
    def num_ranks(self) -> int:
        return self.data.num_ranks

    @property
    def num_microbatches(self) -> int:
        return self.data.num_microbatches

    def with_factory(self, factory: str) -> Plan:
        """The same plan recording the ``FILE.py:FACTORY`` it was built from."""
        new = Plan(
            self.data.model_copy(update={"factory": factory}),
            traced=self.traced,
            loss_fn=self.loss_fn,
            directory=self.directory,
        )
        new._stage_modules = self._stage_modules
        return new

    # -- phases ---------------------------------------------------------
    def simulate(self) -> Simulation:
        """Simulate the plan's schedule with the plan's own costs."""
        from pipec.schedule.simulator import simulate_plan

        return simulate_plan(self)

    def stage_module(self, index: int) -> nn.Module:
        """Stage ``index`` as an ``nn.Module`` whose state_dict keys are the original FQNs."""
        if index not in self._stage_modules:
            from pipec.split import build_stage_module

            self._stage_modules[index] = build_stage_module(self, index)
        return self._stage_modules[index]

    def summary(self) -> str:
        from pipec.summary import plan_summary

        return plan_summary(self)

    def save(self, directory: str | Path) -> Path:
        from pipec.codegen import save_plan

        return save_plan(self, Path(directory))

    def __repr__(self) -> str:
        d = self.data
        return (
            f"Plan(model={d.model_name!r}, num_stages={d.num_stages}, num_ranks={d.num_ranks}, "
            f"schedule={d.schedule.name!r}, num_microbatches={d.num_microbatches}, "
            f"bottleneck={d.bottleneck:.3g}s)"
        )
