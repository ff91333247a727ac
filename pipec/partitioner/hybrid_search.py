"""Phase partition, hybrid search: the fastest (D, P, v, M, schedule, mesh order) on N devices.

Input: a traced graph and its :class:`~pipec.partitioner.hybrid_costs.CostCurve`,
the cost model (links of global ranks), N devices, the global batch G and the
search's ranges. Output: :class:`SearchResult` -- every configuration
evaluated, ranked (fitting first, then simulated step time, then memory), and
how many were simulated, pruned or did not fit.

The space: every ``P`` dividing N with ``D = N / P`` dividing G; every
schedule and its stages per rank ``v`` (interleaved: ``v`` in 2, 4); every
``M`` dividing the replica's batch ``G / D`` up to ``microbatches_per_rank * P``;
both mesh orders where they differ (D > 1 and P > 1). The micro-batch size is
``b = G / (D M)``.

Per configuration, arithmetic only (:mod:`pipec.partitioner.hybrid_costs`):
per-rank memory of the split (parameters, gradients, optimizer state,
activations times the schedule's in-flight micro-batches); per-stage times at
``b``; boundary transfers and each stage's ring all-reduce over its replica
group on the mesh's links (:class:`pipec.costs.mesh_links.MeshCostModel`).
Then the schedule is simulated (:func:`pipec.schedule.simulator.simulate`,
the all-reduces overlapping the drain).

**Pruning, exact**: a step is at least ``max over ranks r`` of ``F(stages
before r's first) + M * work(r) + the shortest all-reduce of r's stages``
(micro-batch 0 must reach rank r before it can start; r then runs all its
work; one of its stages finishes last and all-reduces after). Configurations
are simulated in order of that bound, and the search stops when the bound
reaches the best step found: nothing skipped could have won. ``exhaustive=True``
simulates every configuration, each with its own split (under its own comm
and memory), which is what the benchmark compares the fast search against.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipec.costs.mesh_links import MeshCostModel
from pipec.errors import PartitionError, ScheduleError
from pipec.partitioner.algorithm import solve
from pipec.partitioner.graph import GraphChain, build_chain
from pipec.partitioner.hybrid_costs import CostCurve, SplitRecord, split_record
from pipec.schedule.gen_common import INTERLEAVED
from pipec.schedule.generators import make_schedule
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.schedule.ir import Schedule
from pipec.schedule.mesh import DP_PP, MESH_ORDERS, MeshOrder
from pipec.schedule.simulator import Collective, simulate
from pipec.types import CostModel, TracedGraph

log = logging.getLogger(__name__)

INTERLEAVED_DEPTHS = (2, 4)
MICROBATCHES_PER_RANK = 8


class HybridConfig(NamedTuple):
    """One configuration of the search."""

    data_parallel: int
    num_ranks: int
    schedule: str
    stages_per_rank: int
    num_microbatches: int
    mesh_order: MeshOrder

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.stages_per_rank

    @property
    def label(self) -> str:
        v = f" v={self.stages_per_rank}" if self.stages_per_rank != 1 else ""
        order = f" {'x'.join(self.mesh_order)}" if self.data_parallel > 1 and self.num_ranks > 1 else ""
        return f"D={self.data_parallel} P={self.num_ranks} {self.schedule}{v} m={self.num_microbatches}{order}"


@dataclass(frozen=True)
class Evaluated:
    """One configuration as the search left it. ``step_time`` is simulated when
    ``simulated``, else the lower bound. ``need``: the largest rank's memory."""

    config: HybridConfig
    microbatch_size: int
    step_time: float
    lower_bound: float
    bubble_fraction: float
    rank_memory: tuple[int, ...]
    fits: bool
    simulated: bool
    dp_allreduce_time: float  # the slowest stage's


@dataclass(frozen=True)
class SearchResult:
    ranked: tuple[Evaluated, ...]  # fitting and simulated first, fastest first
    num_configs: int
    num_simulated: int
    num_pruned: int
    num_unfit: int
    seconds: float

    @property
    def best(self) -> Evaluated | None:
        first = self.ranked[0] if self.ranked else None
        return first if first is not None and first.fits and first.simulated else None


@dataclass(frozen=True)
class SearchInputs:
    """What the search needs besides the space."""

    traced: TracedGraph
    curve: CostCurve
    cost_model: CostModel  # links between global ranks, nodes of devices_per_node
    devices_per_node: int
    memory_limit: int | None
    optimizer_state_bytes_per_param: int


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_space(
    *, num_devices: int, global_batch: int, schedules: Sequence[str], stages_per_rank: int | None,
    num_microbatches: int | None, num_ranks: int | None = None, max_stages: int,
    microbatches_per_rank: int = MICROBATCHES_PER_RANK, mesh_orders: Sequence[MeshOrder] = MESH_ORDERS,
) -> list[HybridConfig]:
    """The configurations (see the module docstring); ``None`` = search that dimension."""
    out = []
    for p in divisors(num_devices):
        d = num_devices // p
        if global_batch % d or (num_ranks is not None and p != num_ranks):
            continue
        replica_batch = global_batch // d
        for name in schedules:
            depths = (INTERLEAVED_DEPTHS if name in INTERLEAVED else (1,)) if stages_per_rank is None \
                else (stages_per_rank,)
            for v in depths:
                if (v >= 2) != (name in INTERLEAVED) or p * v > max_stages or (name in INTERLEAVED and p < 2):
                    continue
                counts = [num_microbatches] if num_microbatches is not None else [
                    m for m in divisors(replica_batch) if m <= microbatches_per_rank * p]
                for m in counts:
                    if replica_batch % m:
                        continue
                    orders = mesh_orders if d > 1 and p > 1 else (DP_PP,)
                    out += [HybridConfig(d, p, name, v, m, (o[0], o[1])) for o in orders]
    return out


class _Searcher:
    def __init__(self, inputs: SearchInputs, global_batch: int, exhaustive: bool) -> None:
        self.inputs = inputs
        self.global_batch = global_batch
        self.exhaustive = exhaustive
        self._chains: dict[tuple[int, int, tuple[int, ...]], GraphChain] = {}
        self._splits: dict[tuple[object, ...], SplitRecord | None] = {}
        self._schedules: dict[tuple[str, int, int, int], Schedule] = {}
        self._meshes: dict[tuple[int, int, MeshOrder], MeshCostModel] = {}

    # -- cached pieces -------------------------------------------------------
    def schedule(self, c: HybridConfig) -> Schedule:
        key = (c.schedule, c.num_stages, c.num_microbatches, c.stages_per_rank)
        if key not in self._schedules:
            self._schedules[key] = make_schedule(c.schedule, c.num_stages, c.num_microbatches, c.stages_per_rank)
        return self._schedules[key]

    def mesh(self, c: HybridConfig) -> MeshCostModel:
        key = (c.data_parallel, c.num_ranks, c.mesh_order)
        if key not in self._meshes:
            self._meshes[key] = MeshCostModel(self.inputs.cost_model, data_parallel=c.data_parallel,
                                              num_ranks=c.num_ranks, mesh_order=c.mesh_order,
                                              devices_per_node=self.inputs.devices_per_node)
        return self._meshes[key]

    def chain(self, num_stages: int, num_ranks: int, placement: tuple[int, ...]) -> GraphChain:
        key = (num_stages, num_ranks, placement)
        if key not in self._chains:
            curve = self.inputs.curve
            self._chains[key] = build_chain(
                self.inputs.traced, curve.costs[0], num_stages=num_stages, num_ranks=num_ranks,
                placement=placement, optimizer_state_bytes_per_param=self.inputs.optimizer_state_bytes_per_param)
        return self._chains[key]

    def problem(self, chain: GraphChain, size: int, **changes: object) -> object:
        """The chain problem at micro-batch size ``size`` (times and bytes scaled)."""
        curve = self.inputs.curve
        f, i, w = curve.times(chain.names, size)
        ratio = size / curve.reference
        p = chain.problem
        return dataclasses.replace(
            p, compute_time=tuple(float(x) for x in f + i + w),
            saved_bytes=None if p.saved_bytes is None else tuple(int(round(s * ratio)) for s in p.saved_bytes),
            tensors=tuple(dataclasses.replace(t, num_bytes=int(round(t.num_bytes * ratio))) for t in p.tensors),
            **changes)  # type: ignore[arg-type]

    def split(self, c: HybridConfig, size: int, *, in_flight: tuple[int, ...] | None) -> SplitRecord | None:
        """The split of ``c``: reused across D, M and mesh order (``in_flight`` None:
        compute time only), or under the memory limit (``in_flight`` given); None
        when nothing fits."""
        sched = self.schedule(c)
        placement = tuple(sched.placement)
        limits = None if in_flight is None else (self.inputs.memory_limit,) * c.num_ranks
        exact = self.exhaustive
        key: tuple[object, ...] = (c.num_stages, c.num_ranks, placement, in_flight,
                                   size if (in_flight is not None or exact) else None,
                                   c if exact else None)
        if key in self._splits:
            return self._splits[key]
        chain = self.chain(c.num_stages, c.num_ranks, placement)
        at = size if (in_flight is not None or exact) else max(self.inputs.curve.sizes)
        changes: dict[str, object] = dict(memory_limit=limits, in_flight=in_flight, schedule=c.schedule,
                                          num_microbatches=c.num_microbatches)
        if exact:
            mesh = self.mesh(c)
            changes.update(comm_time=mesh.comm_time, allreduce_time=mesh.allreduce_time)
        problem = self.problem(chain, at, **changes)
        try:
            cuts = solve(problem, "optimal").cuts  # type: ignore[arg-type]
        except PartitionError:
            self._splits[key] = None
            return None
        # memory and crossings at the reference size (SplitRecord scales them); parameters do not scale
        record = split_record(chain, chain.problem, cuts, self.inputs.curve.reference)
        self._splits[key] = record
        return record

    # -- one configuration -----------------------------------------------------
    def evaluate(self, c: HybridConfig) -> tuple[Evaluated, Callable[[], Evaluated]] | None:
        """The configuration's memory and lower bound now, and a function that simulates it."""
        size = self.global_batch // (c.data_parallel * c.num_microbatches)
        sched = self.schedule(c)
        in_flight = in_flight_from_schedule(sched)
        limit = self.inputs.memory_limit
        record = None if self.exhaustive else self.split(c, size, in_flight=None)
        memory = record.memory(size, in_flight, c.num_ranks) if record is not None else ()
        if record is None or (limit is not None and max(memory) > limit):
            resplit = self.split(c, size, in_flight=in_flight)
            if resplit is None and record is None:  # nothing fits: say what the compute-balanced split needs
                self.exhaustive, exhaustive = False, self.exhaustive
                try:
                    resplit = self.split(c, size, in_flight=None)
                finally:
                    self.exhaustive = exhaustive
            if resplit is not None:
                record = resplit
                memory = record.memory(size, in_flight, c.num_ranks)
        if record is None:
            return None
        fits = limit is None or max(memory) <= limit
        mesh = self.mesh(c)
        f, i, w = record.stage_times(self.inputs.curve, size, [1.0] * c.num_ranks)
        allreduce = [mesh.dp_allreduce_time(g, r) for g, r in zip(record.grad_bytes, record.placement)]
        bound = _lower_bound(record.placement, c.num_ranks, c.num_microbatches, f.tolist(), (i + w).tolist(),
                             allreduce)
        dp_time = max(allreduce, default=0.0)
        now = Evaluated(c, size, bound, bound, 0.0, memory, fits, False, dp_time)

        def run() -> Evaluated:
            transfers: dict[tuple[int, int], tuple[float, float]] = {}
            ratio = size / record.reference
            for x in record.crossings:
                seconds = mesh.comm_time(int(round(x.num_bytes * ratio)), record.placement[x.producer],
                                         record.placement[x.consumer])
                fwd, bwd = transfers.get((x.producer, x.consumer), (0.0, 0.0))
                transfers[(x.producer, x.consumer)] = (fwd + seconds, bwd + (seconds if x.is_floating else 0.0))
            tied = []
            for num_bytes, stages in record.tied:  # as plan_collectives: after the schedule, among the holders
                ranks = tuple(sorted({record.placement[k] for k in stages}))
                if len(ranks) > 1:
                    tied.append(Collective("tied", ranks, mesh.allreduce_time(num_bytes, ranks)))
            sim = simulate(sched, forward=tuple(f), input_grad=tuple(i), weight_grad=tuple(w),
                           transfers=transfers, collectives=tied,
                           grad_allreduce=allreduce if c.data_parallel > 1 else None)
            return dataclasses.replace(now, step_time=sim.step_time, bubble_fraction=sim.bubble_fraction,
                                       simulated=True)

        return now, run


def _lower_bound(placement: Sequence[int], num_ranks: int, num_microbatches: int, forward: Sequence[float],
                 backward: Sequence[float], allreduce: Sequence[float]) -> float:
    """The bound of the module docstring."""
    work = [0.0] * num_ranks
    first = [len(placement)] * num_ranks
    last_reduce = [math.inf] * num_ranks
    for k, r in enumerate(placement):
        work[r] += forward[k] + backward[k]
        first[r] = min(first[r], k)
        last_reduce[r] = min(last_reduce[r], allreduce[k])
    before = [0.0]
    for x in forward:
        before.append(before[-1] + x)
    return max(before[first[r]] + num_microbatches * work[r] + last_reduce[r] for r in range(num_ranks))


def search(
    inputs: SearchInputs, configs: Sequence[HybridConfig], *, global_batch: int, exhaustive: bool = False,
    progress: Callable[[], None] | None = None,
) -> SearchResult:
    """Evaluate ``configs`` (see the module docstring) and rank them."""
    started = time.perf_counter()
    searcher = _Searcher(inputs, global_batch, exhaustive)
    pending: list[tuple[Evaluated, Callable[[], Evaluated]]] = []
    done: list[Evaluated] = []
    for c in configs:
        try:
            got = searcher.evaluate(c)
        except (PartitionError, ScheduleError) as exc:
            log.info("hybrid search: %s left out: %s", c.label, " ".join(str(exc).split()))
            got = None
        if got is not None:
            pending.append(got)
        if progress is not None:
            progress()
    unfit = [e for e, _ in pending if not e.fits]
    fitting = sorted(((e, run) for e, run in pending if e.fits), key=lambda x: (x[0].lower_bound, x[0].config))
    best = math.inf
    pruned = 0
    for e, run in fitting:
        if not exhaustive and e.lower_bound >= best * (1 + 1e-9):
            done.append(e)
            pruned += 1
            continue
        try:
            simulated = run()
        except ScheduleError as exc:
            log.info("hybrid search: %s cannot be simulated: %s", e.config.label, " ".join(str(exc).split()))
            continue
        done.append(simulated)
        best = min(best, simulated.step_time)
    ranked = sorted(done + unfit, key=lambda e: (not e.fits, not e.simulated, float(f"{e.step_time:.9g}"),
                                                 max(e.rank_memory, default=0), e.config))
    return SearchResult(tuple(ranked), len(configs), len(done) - pruned, pruned, len(unfit),
                        time.perf_counter() - started)


__all__ = [
    "INTERLEAVED_DEPTHS",
    "MICROBATCHES_PER_RANK",
    "Evaluated",
    "HybridConfig",
    "SearchInputs",
    "SearchResult",
    "divisors",
    "search",
    "search_space",
]
