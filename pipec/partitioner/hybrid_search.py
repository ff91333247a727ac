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

**Pruning, exact**: before any split, a step is at least ``M`` times the
larger of the balanced share of the work ``W / P`` and the largest node (some
rank runs it for every micro-batch); with the split, at least ``max over
ranks r`` of ``F(stages before r's first) + M * work(r) + the shortest
all-reduce of r's stages`` (micro-batch 0 must reach rank r before it can
start; r then runs all its work; one of its stages finishes last and
all-reduces after). The search takes configurations best bound first,
splitting or simulating the one on top, and stops when the smallest bound
reaches the best step simulated: nothing left could have won.

**Reuse, approximate** (the fast search): one split per (stages, ranks,
placement) on compute time alone, reused across D, M and mesh order; where it
does not fit memory, a split made under the limit for another M or D that
fits, else a new one under the limit. ``exhaustive=True`` splits every
configuration on its own (its own links, memory limit and micro-batch size):
the reference the benchmark compares the fast search against
(``prune=False`` also simulates every one). The fast search ends by splitting
exactly so the configurations within :data:`REFINE_WITHIN` of its best, and
ranks them by that split, the one their plan will have.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipec.costs.mesh_links import MeshCostModel
from pipec.errors import PartitionError, ScheduleError
from pipec.partitioner.algorithm import check_cut_count, optimal
from pipec.partitioner.graph import GraphChain, build_chain
from pipec.partitioner.hybrid_costs import F64, CostCurve, SplitRecord, split_record
from pipec.schedule.gen_common import INTERLEAVED
from pipec.schedule.generators import make_schedule
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.schedule.ir import Schedule, round_robin_placement
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


# in-flight counts in closed form (pipec.schedule.in_flight's docstring; its tests hold
# them to the generated schedules), so the search generates a schedule only to simulate it
_CLOSED_FORMS: dict[str, Callable[[int, int, int, int], int]] = {
    "gpipe": lambda k, s, r, m: m,
    "1f1b": lambda k, s, r, m: min(s - k, m),
    "zb-h1": lambda k, s, r, m: min(r, m),
}


def in_flight_and_placement(c: HybridConfig, schedule: Callable[[], Schedule]) -> tuple[tuple[int, ...],
                                                                                       tuple[int, ...]]:
    """``in_flight`` per stage and the placement of configuration ``c``: closed forms for
    one stage per rank, else read off the generated schedule."""
    form = _CLOSED_FORMS.get(c.schedule)
    if form is not None and c.stages_per_rank == 1:
        s = c.num_stages
        return (tuple(form(k, s, c.num_ranks, c.num_microbatches) for k in range(s)),
                round_robin_placement(s, c.num_ranks))
    sched = schedule()
    return in_flight_from_schedule(sched), tuple(sched.placement)


class _Searcher:
    def __init__(self, inputs: SearchInputs, global_batch: int, exhaustive: bool) -> None:
        self.inputs = inputs
        self.global_batch = global_batch
        self.exhaustive = exhaustive
        self._chains: dict[tuple[int, int, tuple[int, ...]], GraphChain] = {}
        self._splits: dict[tuple[object, ...], SplitRecord | None] = {}
        self._schedules: dict[tuple[str, int, int, int], Schedule] = {}
        self._shapes: dict[tuple[str, int, int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._work: dict[int, tuple[float, float]] = {}
        self._times: dict[int, tuple[F64, F64, F64]] = {}
        self._meshes: dict[tuple[int, int, MeshOrder], MeshCostModel] = {}

    # -- cached pieces -------------------------------------------------------
    def schedule(self, c: HybridConfig) -> Schedule:
        key = (c.schedule, c.num_stages, c.num_microbatches, c.stages_per_rank)
        if key not in self._schedules:
            self._schedules[key] = make_schedule(c.schedule, c.num_stages, c.num_microbatches, c.stages_per_rank)
        return self._schedules[key]

    def placement(self, c: HybridConfig) -> tuple[int, ...]:
        return self.shape(c)[1]

    def shape(self, c: HybridConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        key = (c.schedule, c.num_stages, c.num_microbatches, c.stages_per_rank)
        if key not in self._shapes:
            self._shapes[key] = in_flight_and_placement(c, lambda: self.schedule(c))
        return self._shapes[key]

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
        f, i, w = self.node_times(size)
        ratio = size / self.inputs.curve.reference
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
        placement = self.placement(c)
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
        check_cut_count(problem)  # type: ignore[arg-type]
        try:
            cuts = optimal(problem, explain=False).cuts  # type: ignore[arg-type]
        except PartitionError:
            self._splits[key] = None
            return None
        # memory and crossings at the reference size (SplitRecord scales them); parameters do not scale
        record = split_record(chain, chain.problem, cuts, self.inputs.curve.reference)
        self._splits[key] = record
        return record

    def node_times(self, size: int) -> tuple[F64, F64, F64]:
        """F, I, W per chain position at ``size`` (every chain has the traced graph's positions)."""
        if size not in self._times:
            self._times[size] = self.inputs.curve.times(self.chain(1, 1, (0,)).names, size)
        return self._times[size]

    def size(self, c: HybridConfig) -> int:
        return self.global_batch // (c.data_parallel * c.num_microbatches)

    def quick_bound(self, c: HybridConfig) -> float:
        """A bound on the step that needs no split: ``M`` times the larger of the
        perfectly balanced share of the work and the largest node."""
        size = self.size(c)
        if size not in self._work:
            f, i, w = self.node_times(size)
            total = f + i + w
            self._work[size] = (float(total.sum()), float(total.max(initial=0.0)))
        work, largest = self._work[size]
        return c.num_microbatches * max(work / c.num_ranks, largest)

    # -- one configuration -----------------------------------------------------
    def resplit_bound(self, c: HybridConfig) -> float | None:
        """None when the reused split serves ``c`` (it fits, or nothing could); else a
        bound on ``c``'s step under the split it needs (re-splitting is the costly
        part, so it waits its turn in the search's heap): ``M`` times the reused split's
        slowest stage, which no split beats (the reused split minimises it)."""
        if self.exhaustive:
            return None
        size, limit = self.size(c), self.inputs.memory_limit
        record = self.split(c, size, in_flight=None)
        if record is None or limit is None:
            return None
        in_flight = self.shape(c)[0]
        if max(record.memory(size, in_flight, c.num_ranks)) <= limit or self._hopeless(record, c, size):
            return None
        f, i, w = record.stage_times(self.node_times(size), [1.0] * c.num_ranks)
        return c.num_microbatches * float((f + i + w).max())

    def _fitting_split(self, c: HybridConfig, size: int, in_flight: tuple[int, ...]) -> SplitRecord | None:
        """Fast search only: of the splits already made under the memory limit for the
        same stages and placement (another M, D or size), the one that fits ``c`` with
        the smallest slowest stage -- a re-split costs far more than this look."""
        if self.exhaustive or self.inputs.memory_limit is None:
            return None
        placement = self.placement(c)
        best: tuple[float, SplitRecord] | None = None
        for key, record in self._splits.items():
            if record is None or key[:3] != (c.num_stages, c.num_ranks, placement) or key[3] is None:
                continue
            if max(record.memory(size, in_flight, c.num_ranks)) > self.inputs.memory_limit:
                continue
            f, i, w = record.stage_times(self.node_times(size), [1.0] * c.num_ranks)
            slowest = float((f + i + w).max())
            if best is None or slowest < best[0]:
                best = (slowest, record)
        return None if best is None else best[1]

    def _hopeless(self, record: SplitRecord, c: HybridConfig, size: int) -> bool:
        """Whether no split can fit: the weights plus the fewest activations any stage
        holds, spread evenly over the ranks, overflow them."""
        limit = self.inputs.memory_limit
        if limit is None:
            return False
        fewest = min(self.shape(c)[0])
        total = sum(record.static_memory) + sum(record.activation_memory) * size / record.reference * fewest
        return total > limit * c.num_ranks

    def evaluate(self, c: HybridConfig) -> tuple[Evaluated, Callable[[], Evaluated]] | None:
        """The configuration's memory and lower bound now, and a function that simulates it."""
        size = self.size(c)
        in_flight = self.shape(c)[0]
        limit = self.inputs.memory_limit
        record = None if self.exhaustive else self.split(c, size, in_flight=None)
        memory = record.memory(size, in_flight, c.num_ranks) if record is not None else ()
        hopeless = record is not None and self._hopeless(record, c, size)
        if not hopeless and (record is None or (limit is not None and max(memory) > limit)):
            resplit = self._fitting_split(c, size, in_flight) or self.split(c, size, in_flight=in_flight)
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
        f, i, w = record.stage_times(self.node_times(size), [1.0] * c.num_ranks)
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
            sim = simulate(self.schedule(c), forward=tuple(f), input_grad=tuple(i), weight_grad=tuple(w),
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


REFINE_WITHIN = 0.25  # the fast search re-splits exactly the configurations this close to its best


def _refine(fast: _Searcher, done: list[Evaluated], best: float) -> list[Evaluated]:
    """The fast search's best configurations (within :data:`REFINE_WITHIN` of the best),
    each split again on its own -- under its own links, memory limit and micro-batch
    size -- and simulated, as the plan will be split (:func:`pipec.partitioner.hybrid.finish`):
    a reused split ignores the links (and is made at another size), which matters
    where transfers are a large part of the step, and either split may simulate
    the faster, the partitioner's cost counting transfers as stage time."""
    exact = _Searcher(fast.inputs, fast.global_batch, exhaustive=True)
    exact._chains, exact._schedules, exact._meshes, exact._shapes = (
        fast._chains, fast._schedules, fast._meshes, fast._shapes)
    exact._times = fast._times
    out = []
    for e in done:
        if e.step_time <= best * (1 + REFINE_WITHIN):
            try:
                got = exact.evaluate(e.config)
                again = got[1]() if got is not None and got[0].fits else None
            except (PartitionError, ScheduleError):
                again = None
            if again is not None:  # the plan is split this way: rank it by this split's step
                e = again
        out.append(e)
    return out


def search(
    inputs: SearchInputs, configs: Sequence[HybridConfig], *, global_batch: int, exhaustive: bool = False,
    prune: bool = True, progress: Callable[[], None] | None = None,
) -> SearchResult:
    """Evaluate ``configs`` (see the module docstring) and rank them.

    Best first: every configuration starts in a heap under its quick bound
    (:meth:`_Searcher.quick_bound`, no split needed); the smallest entry is split
    and goes back under its bound with the split, or -- already split -- is
    simulated. The search stops when the smallest bound reaches the best step
    simulated (ties: the cheaper simulation first). ``exhaustive``: every
    configuration split on its own (its own links, memory and size: no reuse);
    ``prune=False``: every one simulated too."""
    started = time.perf_counter()
    searcher = _Searcher(inputs, global_batch, exhaustive)
    # (bound, cost of simulating, order, config, evaluation, stage: 0 new, 1 needs a re-split, 2 evaluated)
    heap: list[tuple[float, int, int, HybridConfig, tuple[Evaluated, Callable[[], Evaluated]] | None, int]] = []
    for n, c in enumerate(configs):
        heapq.heappush(heap, (searcher.quick_bound(c), c.num_stages * c.num_microbatches, n, c, None, 0))
    done: list[Evaluated] = []
    unfit: list[Evaluated] = []
    best = math.inf
    while heap and (not prune or heap[0][0] < best * (1 - 1e-9)):
        bound, cost, n, c, got, stage = heapq.heappop(heap)
        if got is None:
            try:
                later = searcher.resplit_bound(c) if stage == 0 else None
                if later is not None:
                    heapq.heappush(heap, (max(bound, later), cost, n, c, None, 1))
                    continue
                got = searcher.evaluate(c)
            except (PartitionError, ScheduleError) as exc:
                log.info("hybrid search: %s left out: %s", c.label, " ".join(str(exc).split()))
                got = None
            if progress is not None:
                progress()
            if got is None:
                continue
            if not got[0].fits:
                unfit.append(got[0])
            else:
                heapq.heappush(heap, (max(bound, got[0].lower_bound), cost, n, c, got, 2))
            continue
        try:
            simulated = got[1]()
        except ScheduleError as exc:
            log.info("hybrid search: %s cannot be simulated: %s", c.label, " ".join(str(exc).split()))
            continue
        done.append(simulated)
        best = min(best, simulated.step_time)
    if not exhaustive and done:
        done = _refine(searcher, done, best)
    bounded = [entry[4][0] if entry[4] is not None else
               Evaluated(entry[3], searcher.size(entry[3]), entry[0], entry[0], 0.0, (), True, False, 0.0)
               for entry in heap]
    ranked = sorted(done + bounded + unfit, key=lambda e: (not e.fits, not e.simulated, float(f"{e.step_time:.9g}"),
                                                           max(e.rank_memory, default=0), e.config))
    return SearchResult(tuple(ranked), len(configs), len(done), len(bounded), len(unfit),
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
