"""Phase partition, hybrid: D replicas of a P-rank pipeline, priced and placed on nodes.

Input: the arguments of :func:`pipec.partition` with ``data_parallel=D`` (an
int) or ``data_parallel="auto"`` and ``num_devices=N``. ``example_inputs`` is
the GLOBAL batch: each replica gets ``global / D`` samples, cut into ``M``
micro-batches. Output: :class:`~pipec.partitioner.single.Partitioned` whose
plan data records ``data_parallel``, ``mesh_order`` and ``devices_per_node``,
and per stage ``dp_allreduce_time`` (its gradient all-reduce across the
replicas, which ``plan.simulate()`` overlaps with the pipeline's drain).

The phases, in order::

    check arguments        D divides N, G divisible by D x M, ... (PipecError)
    link model             the cost model, nodes of devices_per_node ranks
    (auto) search          pipec.partitioner.hybrid_search over (D, P, v, M, schedule, mesh order):
                           the model traced at the smallest and largest micro-batch
                           sizes only; every other size interpolated
    plan one               trace at the chosen micro-batch size, split with the
                           mesh's links (pipec.costs.mesh_links), price the all-reduces
    place                  mesh_order: ("dp", "pp") keeps a pipeline's neighbours
                           together, ("pp", "dp") a stage's replicas; the faster one
                           by simulation (both are tried)

The runtime side (DeviceMesh, the bucketed all-reduce, launching) is not here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipec.costs.mesh_links import MeshCostModel, with_devices_per_node
from pipec.errors import ConfigError, PartitionError
from pipec.partitioner import config
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.hybrid_costs import CostCurve
from pipec.partitioner.hybrid_search import (
    MICROBATCHES_PER_RANK,
    Evaluated,
    HybridConfig,
    SearchInputs,
    SearchResult,
    search,
    search_space,
)
from pipec.partitioner.inputs import AUTO, batch_size, first_microbatch, first_target, split_inputs
from pipec.partitioner.single import Partitioned, partition_traced, resolve_cost_model
from pipec.plan import Candidate, PlanData
from pipec.schedule.mesh import MESH_ORDERS, MeshOrder
from pipec.schedule.simulator import simulate_plan
from pipec.types import CostModel, TracedGraph
from pipec.units import format_bytes, format_seconds

log = logging.getLogger(__name__)

MAX_CANDIDATES = 200  # rows kept in plan.candidates (the best first); the rest are counted
FINALISTS_WITHIN = 0.05  # configurations this close to the search's best are each planned in full
MAX_FINALISTS = 3


def check_data_parallel(data_parallel: object, num_devices: object, devices_per_node: object) -> None:
    """The hybrid arguments at the API boundary (ConfigError says what to pass)."""
    if data_parallel == AUTO:
        if num_devices is None:
            raise ConfigError(
                "data_parallel='auto' needs num_devices=N, the devices to plan for (e.g. num_devices=64); "
                "pass it, or a fixed data_parallel=D"
            )
        config.count("num_devices", num_devices)
    else:
        d = config.count("data_parallel", data_parallel,
                         advice=" (the number of pipeline replicas, or 'auto' with num_devices=N)")
        if num_devices is not None:
            n = config.count("num_devices", num_devices)
            if d == 1:
                raise ConfigError(
                    f"num_devices={num_devices} without data_parallel: num_devices is read with "
                    "data_parallel='auto' (search D x P = num_devices) or data_parallel=D (P = num_devices / D); "
                    "pass one of these, or num_stages alone for one pipeline"
                )
            if n % d:
                raise ConfigError(
                    f"data_parallel={d} does not divide num_devices={n}: every replica needs the same number "
                    f"of devices; use a D in {[k for k in range(1, n + 1) if n % k == 0]}, or data_parallel='auto'"
                )
    if devices_per_node is not None:
        config.count("devices_per_node", devices_per_node)


def sharded_state_bytes(optimizer_state_bytes_per_param: int, data_parallel: int, zero: int) -> int:
    """Optimizer-state bytes per parameter one rank holds: all of it, or under ZeRO-1 its
    ``1 / D`` share (rounded up: the shards are equal to within one element)."""
    if not zero or data_parallel < 2:
        return optimizer_state_bytes_per_param
    return -(-optimizer_state_bytes_per_param // data_parallel)


def price_data_parallel(data: PlanData, mesh: MeshCostModel) -> PlanData:
    """``data`` as one pipeline of ``mesh``: D, mesh order, node size, and each stage's
    gradient all-reduce across its replicas (``StageInfo.dp_allreduce_time``)."""
    stages = tuple(st.model_copy(update={"dp_allreduce_time": mesh.dp_allreduce_time(st.param_bytes, st.rank)})
                   for st in data.stages)
    return data.model_copy(update={
        "stages": stages, "data_parallel": mesh.data_parallel, "mesh_order": mesh.mesh_order,
        "devices_per_node": mesh.devices_per_node,
    })


def _base_model(cost_model: str | Path | CostModel, traced: TracedGraph, devices_per_node: int | None,
                loss_fn: Callable[..., Any] | None, target: Any, precision: str = "fp32") -> tuple[CostModel, int]:
    model, nodes = with_devices_per_node(
        resolve_cost_model(cost_model, traced, loss_fn=loss_fn, target=target, precision=precision),
        devices_per_node)
    if nodes is None:
        raise ConfigError(
            f"devices_per_node: the cost model {model.name!r} does not say how many devices a node has; "
            "pass devices_per_node=K (e.g. 8)"
        )
    return model, nodes


def plan_with_mesh(
    traced: TracedGraph, costs: Mapping[str, Any], base: CostModel, *, data_parallel: int, num_stages: int,
    num_microbatches: int, schedule: str, stages_per_rank: int, devices_per_node: int, memory_limit: MemoryLimit,
    strategy: str, optimizer_state_bytes_per_param: int, batch: int | None,
    mesh_orders: Iterable[MeshOrder] = MESH_ORDERS, precision: str = "fp32", recompute: str = "none",
    zero: int = 0,
) -> PlanData:
    """One configuration on a D x P mesh: split under each mesh order's links, price the
    all-reduces, and keep the order whose simulated step is shorter (the first on a tie;
    with D = 1 or P = 1 the orders are the same mesh). ``zero=1`` (ZeRO-1: the optimizer
    state sharded over the D replicas, :mod:`pipec.runtime.zero`) counts
    ``ceil(optimizer_state_bytes_per_param / D)`` bytes of state per parameter on a rank."""
    ranks = config.num_ranks(num_stages, stages_per_rank)
    orders = list(mesh_orders) if data_parallel > 1 and ranks > 1 else [next(iter(mesh_orders))]
    best: tuple[float, PlanData] | None = None
    for order in orders:
        mesh = MeshCostModel(base, data_parallel=data_parallel, num_ranks=ranks, mesh_order=order,
                             devices_per_node=devices_per_node)
        data = partition_traced(
            traced, costs, num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
            stages_per_rank=stages_per_rank, cost_model=mesh, memory_limit=memory_limit, strategy=strategy,
            optimizer_state_bytes_per_param=sharded_state_bytes(optimizer_state_bytes_per_param, data_parallel, zero),
            batch_size=batch, precision=precision, recompute=recompute)
        data = price_data_parallel(data, mesh).model_copy(
            update={"zero": zero, "optimizer_state_bytes_per_param": optimizer_state_bytes_per_param})
        step = simulate_plan(data).step_time
        log.info("D=%d P=%d mesh %s: simulated step %s", data_parallel, ranks, "x".join(order), format_seconds(step))
        if best is None or step < best[0] * (1 - 1e-9):
            best = (step, data)
    if best is None:
        raise ConfigError(f"mesh_orders: expected at least one of {list(MESH_ORDERS)}, found none")
    return best[1]


def partition_data_parallel(
    model: nn.Module, example_inputs: Any, *, data_parallel: int, num_stages: int, num_microbatches: int,
    schedule: str, stages_per_rank: int, loss_fn: Callable[..., Any] | None, cost_model: str | Path | CostModel,
    memory_limit: MemoryLimit, strategy: str, example_kwargs: Mapping[str, Any] | None, method: str,
    optimizer_state_bytes_per_param: int, leaf_modules: Iterable[type[nn.Module] | str], target: Any = None,
    devices_per_node: int | None = None, precision: str = "fp32", recompute: str = "none", zero: int = 0,
) -> Partitioned:
    """A fixed ``data_parallel=D`` plan: the global batch split over D x M, placed by the
    faster mesh order (see :func:`plan_with_mesh`)."""
    from pipec.tracing import trace

    args, kwargs = split_inputs(example_inputs, example_kwargs)
    batch = batch_size(args, kwargs)
    parts = _check_batch(batch, data_parallel, num_microbatches)
    mb_args, mb_kwargs = first_microbatch(args, kwargs, parts)
    traced = trace(model, mb_args, mb_kwargs, method=method, leaf_modules=tuple(leaf_modules))
    base, nodes = _base_model(cost_model, traced, devices_per_node, loss_fn, first_target(target, parts), precision)
    data = plan_with_mesh(
        traced, base.node_costs(traced), base, data_parallel=data_parallel, num_stages=num_stages,
        num_microbatches=num_microbatches, schedule=schedule, stages_per_rank=stages_per_rank,
        devices_per_node=nodes, memory_limit=memory_limit, strategy=strategy,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, batch=batch, precision=precision,
        recompute=recompute, zero=zero)
    return Partitioned(data, traced)


def partition_hybrid(
    model: nn.Module, example_inputs: Any, *, data_parallel: int | str, num_devices: int | None,
    devices_per_node: int | None, num_stages: int | None, num_microbatches: int | str | None, schedule: object,
    stages_per_rank: int | str, loss_fn: Callable[..., Any] | None, cost_model: str | Path | CostModel,
    memory_limit: MemoryLimit, strategy: str, example_kwargs: Mapping[str, Any] | None, method: str,
    optimizer_state_bytes_per_param: int, leaf_modules: Iterable[type[nn.Module] | str], target: Any = None,
    precision: str = "fp32", recompute: str = "none", zero: int = 0,
) -> Partitioned:
    """:func:`pipec.partition` with ``data_parallel`` or ``devices_per_node`` given: the
    search (``"auto"``, or an int D with some choice ``"auto"``: P fixed by
    ``num_stages``) or one D x P plan."""
    check_data_parallel(data_parallel, num_devices, devices_per_node)
    if not isinstance(schedule, str):
        raise ConfigError(f"schedule: with data_parallel, expected a schedule name or 'auto', found "
                          f"{type(schedule).__name__}; pass the name of one of pipec's schedules")
    common: dict[str, Any] = dict(
        loss_fn=loss_fn, cost_model=cost_model, memory_limit=memory_limit, strategy=strategy,
        example_kwargs=example_kwargs, method=method, target=target, leaf_modules=leaf_modules,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, precision=precision, recompute=recompute,
        zero=zero)
    if data_parallel != AUTO and num_devices is not None:  # P = N / D ranks
        ranks = num_devices // int(data_parallel)
        if num_stages is None:
            num_stages = ranks if stages_per_rank == AUTO else ranks * config.count("stages_per_rank", stages_per_rank)
        elif num_stages != (ranks if stages_per_rank == AUTO else ranks * int(stages_per_rank)):
            raise ConfigError(
                f"num_stages={num_stages} with data_parallel={data_parallel} on num_devices={num_devices}: the "
                f"pipeline has {ranks} ranks (num_devices / data_parallel), so num_stages must be {ranks} x "
                "stages_per_rank; leave num_stages out, or change num_devices"
            )
    if data_parallel == AUTO or AUTO in (schedule, num_microbatches, stages_per_rank):
        if data_parallel != AUTO:
            if num_stages is None:
                raise ConfigError("num_stages: expected an int with a fixed data_parallel, found None; pass "
                                  "num_stages, or data_parallel='auto' with num_devices=N")
            ranks = num_stages if stages_per_rank == AUTO else config.num_ranks(num_stages, int(stages_per_rank))
            num_devices = int(data_parallel) * ranks
        return partition_hybrid_auto(
            model, example_inputs, num_devices=int(num_devices or 0), devices_per_node=devices_per_node,
            num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
            stages_per_rank=stages_per_rank, **common)
    if num_stages is None:
        raise ConfigError("num_stages: expected the number of pipeline stages (an int), found None; pass "
                          "num_stages=N, or data_parallel='auto' with num_devices=N to search it")
    from pipec.partitioner.inputs import default_microbatches

    v = config.count("stages_per_rank", stages_per_rank)
    ranks = config.num_ranks(config.count("num_stages", num_stages), v)
    d = int(data_parallel)
    if num_microbatches is None:
        args, kwargs = split_inputs(example_inputs, example_kwargs)
        batch = batch_size(args, kwargs)
        num_microbatches = default_microbatches(None if batch is None or batch % d else batch // d, ranks)
    return partition_data_parallel(
        model, example_inputs, data_parallel=d, num_stages=num_stages,
        num_microbatches=config.count("num_microbatches", num_microbatches), schedule=schedule,
        stages_per_rank=v, devices_per_node=devices_per_node, **common)


def _check_batch(batch: int | None, data_parallel: int, num_microbatches: int) -> int:
    """How many micro-batches the global batch holds (D x M), or ConfigError."""
    parts = data_parallel * num_microbatches
    if batch is None:
        raise ConfigError(
            f"data_parallel={data_parallel}: the example has no tensor with a batch dimension to split over the "
            "replicas; pass the global batch as example_inputs"
        )
    if batch % parts:
        raise ConfigError(
            f"the global batch ({batch} samples along dim 0) must split into data_parallel x num_microbatches = "
            f"{data_parallel} x {num_microbatches} = {parts} equal micro-batches; use a batch that is a multiple "
            f"of {parts}, or a data_parallel / num_microbatches whose product divides {batch}"
        )
    return parts


@dataclass
class Prepared:
    """A hybrid search ready to run: its configurations, the model traced and costed
    at the micro-batch sizes needed so far (more are traced on demand by :meth:`cost`)."""

    configs: list[HybridConfig]
    inputs: SearchInputs
    batch: int
    memory_limit: MemoryLimit
    cost: Callable[[int], tuple[TracedGraph, Mapping[str, Any]]]
    precision: str = "fp32"
    recompute: str = "none"  # the finalists' plans take it; the search itself estimates without recompute
    zero: int = 0  # likewise: the search counts the whole optimizer state, the finalists their ZeRO-1 share


def prepare_search(
    model: nn.Module, example_inputs: Any, *, num_devices: int, devices_per_node: int | None,
    num_stages: int | None, num_microbatches: int | str | None, schedule: str, stages_per_rank: int | str,
    loss_fn: Callable[..., Any] | None, cost_model: str | Path | CostModel, memory_limit: MemoryLimit,
    example_kwargs: Mapping[str, Any] | None, method: str, optimizer_state_bytes_per_param: int,
    leaf_modules: Iterable[type[nn.Module] | str], target: Any = None, precision: str = "fp32",
    recompute: str = "none", zero: int = 0,
) -> Prepared:
    """The search space and the model traced and costed at its smallest and largest
    micro-batch sizes (see :func:`partition_hybrid_auto` for the arguments)."""
    from pipec.schedule.generators import FIXED_NAMES, SCHEDULE_NAMES
    from pipec.tracing import trace

    args, kwargs = split_inputs(example_inputs, example_kwargs)
    batch = batch_size(args, kwargs)
    if batch is None:
        raise ConfigError("data_parallel='auto': the example has no tensor with a batch dimension; pass the "
                          "global batch as example_inputs")
    if schedule != AUTO and schedule not in SCHEDULE_NAMES:
        raise ConfigError(f"schedule: expected 'auto' or one of {', '.join(SCHEDULE_NAMES)}, found {schedule!r}")
    v = None if stages_per_rank == AUTO else config.count("stages_per_rank", stages_per_rank)
    m = None if num_microbatches in (AUTO, None) else config.count("num_microbatches", num_microbatches)
    config.count("optimizer_state_bytes_per_param", optimizer_state_bytes_per_param, low=0)
    ranks = None
    if num_stages is not None:
        ranks = config.num_ranks(config.count("num_stages", num_stages), v or 1)
    configs = search_space(
        # schedule='auto' searches the fixed schedules: the search times a configuration by a
        # compute-only schedule at interpolated costs, which synth (built from the split's own
        # costs) does not have before its split; ask for schedule='synth' to plan with it
        num_devices=num_devices, global_batch=batch, schedules=FIXED_NAMES if schedule == AUTO else (schedule,),
        stages_per_rank=v, num_microbatches=m, num_ranks=ranks, max_stages=num_devices * max(4, v or 1),
    )
    if not configs:
        fits_d = [d for d in range(1, num_devices + 1) if num_devices % d == 0 and batch % d == 0]
        raise ConfigError(
            f"data_parallel='auto' on num_devices={num_devices} with a global batch of {batch}: no configuration "
            f"to try (D must divide both; D in {fits_d} does"
            + (f", and P = {ranks} must divide num_devices" if ranks is not None else "")
            + (f", and num_microbatches={m} must divide the replica's batch" if m is not None else "")
            + "); change num_devices, the batch, or the fixed choices"
        )
    sizes = sorted({batch // (c.data_parallel * c.num_microbatches) for c in configs})
    traced_at: dict[int, TracedGraph] = {}
    costs_at: dict[int, Mapping[str, Any]] = {}
    models: list[tuple[CostModel, int]] = []

    def cost(size: int) -> tuple[TracedGraph, Mapping[str, Any]]:
        if size not in traced_at:
            mb_args, mb_kwargs = first_microbatch(args, kwargs, batch // size)
            traced_at[size] = trace(model, mb_args, mb_kwargs, method=method, leaf_modules=tuple(leaf_modules))
            model_at = _base_model(cost_model, traced_at[size], devices_per_node, loss_fn,
                                   first_target(target, batch // size), precision)
            models.append(model_at)  # the first one's links serve all: they do not depend on the size
            costs_at[size] = model_at[0].node_costs(traced_at[size])
            log.info("hybrid auto-plan: traced and costed micro-batch size %d", size)
        return traced_at[size], costs_at[size]

    ends = tuple(dict.fromkeys((sizes[0], sizes[-1])))
    curve = CostCurve(ends, tuple(cost(size)[1] for size in ends))
    base, nodes = models[0]
    limit = config.memory_limits(memory_limit, 1, base)[0]
    inputs = SearchInputs(traced_at[ends[0]], curve, base, nodes, limit, optimizer_state_bytes_per_param)
    return Prepared(configs, inputs, batch, memory_limit, cost, precision, recompute, zero)


def partition_hybrid_auto(
    model: nn.Module, example_inputs: Any, *, num_devices: int, devices_per_node: int | None,
    num_stages: int | None, num_microbatches: int | str | None, schedule: str, stages_per_rank: int | str,
    loss_fn: Callable[..., Any] | None, cost_model: str | Path | CostModel, memory_limit: MemoryLimit,
    strategy: str, example_kwargs: Mapping[str, Any] | None, method: str, optimizer_state_bytes_per_param: int,
    leaf_modules: Iterable[type[nn.Module] | str], target: Any = None, exhaustive: bool = False,
    precision: str = "fp32", recompute: str = "none", zero: int = 0,
) -> Partitioned:
    """``data_parallel="auto"``: the fastest simulated (D, P, v, M, schedule, mesh order)
    with D x P = ``num_devices`` that fits memory, at the example's global batch.
    ``num_stages`` (optional) fixes the pipeline's ranks P (its stages with
    ``stages_per_rank``); ``schedule``, ``num_microbatches`` and
    ``stages_per_rank`` search when ``"auto"`` (``num_microbatches=None``: too)."""
    from pipec.costs.timer import progress_bar

    started = time.perf_counter()
    prepared = prepare_search(
        model, example_inputs, num_devices=num_devices, devices_per_node=devices_per_node, num_stages=num_stages,
        num_microbatches=num_microbatches, schedule=schedule, stages_per_rank=stages_per_rank, loss_fn=loss_fn,
        cost_model=cost_model, memory_limit=memory_limit, example_kwargs=example_kwargs, method=method,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, leaf_modules=leaf_modules, target=target,
        precision=precision, recompute=recompute, zero=zero)
    configs = prepared.configs
    with progress_bar(f"hybrid auto-plan: {len(configs)} configurations", total=len(configs),
                      enabled=None) as advance:
        result = search(prepared.inputs, configs, global_batch=prepared.batch, exhaustive=exhaustive,
                        progress=advance)
    log.info("hybrid auto-plan: %d configurations, %d simulated, %d pruned by their bound, %d do not fit, in %.2fs",
             result.num_configs, result.num_simulated, result.num_pruned, result.num_unfit, result.seconds)
    partitioned = finish(prepared, result, strategy=strategy)
    log.info("hybrid auto-plan: done in %.2fs", time.perf_counter() - started)
    return partitioned


def finish(prepared: Prepared, result: SearchResult, *, strategy: str = "optimal") -> Partitioned:
    """The plan of the search's best configuration, traced at its own micro-batch size
    (the next best when that one does not fit once traced there), with the candidates table."""
    inputs = prepared.inputs
    if result.best is None:
        raise _none_fits(result, inputs.devices_per_node, inputs.memory_limit)
    ranked = [e for e in result.ranked if e.fits and e.simulated]
    # the search simulates compute-only schedules at interpolated costs; the plan, the lowered
    # schedule at its own size: the finalists (within FINALISTS_WITHIN of the best, at most
    # MAX_FINALISTS) are each planned, and the fastest plan wins
    finalists = [e for e in ranked if e.step_time <= ranked[0].step_time * (1 + FINALISTS_WITHIN)][:MAX_FINALISTS]
    built: list[tuple[float, Evaluated, PlanData, TracedGraph]] = []
    for winner in finalists + ranked[len(finalists):len(finalists) + 3]:
        if built and winner not in finalists:
            break  # a finalist was planned; the next ones only stand in for finalists that do not fit
        c = winner.config
        traced, costs = prepared.cost(winner.microbatch_size)
        try:
            data = plan_with_mesh(
                traced, costs, inputs.cost_model, data_parallel=c.data_parallel, num_stages=c.num_stages,
                num_microbatches=c.num_microbatches, schedule=c.schedule, stages_per_rank=c.stages_per_rank,
                devices_per_node=inputs.devices_per_node, memory_limit=prepared.memory_limit, strategy=strategy,
                optimizer_state_bytes_per_param=inputs.optimizer_state_bytes_per_param, batch=prepared.batch,
                mesh_orders=(c.mesh_order,), precision=prepared.precision, recompute=prepared.recompute,
                zero=prepared.zero)
        except PartitionError as exc:
            log.info("hybrid auto-plan: %s does not fit once traced at its own size: %s", c.label, exc)
            continue
        built.append((simulate_plan(data).step_time, winner, data, traced))
    if built:
        step, winner, data, traced = min(built, key=lambda b: b[0])
        data = data.model_copy(update={"candidates": candidates(result, winner, step), "chosen": 0})
        log.info("hybrid auto-plan: chose %s (%s per step)", winner.config.label, format_seconds(step))
        return Partitioned(data, traced)
    raise PartitionError(
        f"hybrid auto-plan: the best configurations the search found ({result.ranked[0].config.label}, ...) do "
        "not fit memory once traced at their own micro-batch size; raise memory_limit or use more devices"
    )


def candidates(result: SearchResult, winner: Evaluated, step_time: float) -> tuple[Candidate, ...]:
    """The search's configurations as :class:`Candidate` rows, the winner first, each with
    its search estimate (compute-only schedule, interpolated costs: comparable with each
    other) and a note -- the winner's says what its plan simulates; at most :data:`MAX_CANDIDATES`."""
    rows = [winner] + [e for e in result.ranked if e is not winner]
    out = []
    for e in rows[:MAX_CANDIDATES]:
        c = e.config
        if e is winner:
            note = (f"chosen: its plan simulates {format_seconds(step_time)}; of {result.num_configs}: "
                    f"{result.num_simulated} simulated, {result.num_pruned} bounded out, {result.num_unfit} unfit")
        elif not e.fits:
            note = f"needs {format_bytes(max(e.rank_memory))}/rank > limit"
        elif not e.simulated:
            note = "not simulated: bound >= best"
        elif e.step_time < winner.step_time:
            note = "its plan simulates slower" if e.step_time >= winner.step_time * (1 - FINALISTS_WITHIN) \
                else "search estimate only"
        else:
            slower = (e.step_time / winner.step_time - 1.0) * 100 if winner.step_time > 0 else 0.0
            note = f"{slower:.1f}% slower" if slower >= 0.05 else "as fast, more memory"
        out.append(Candidate(
            schedule=c.schedule, num_microbatches=c.num_microbatches, stages_per_rank=c.stages_per_rank,
            step_time=e.step_time, bubble_fraction=e.bubble_fraction,
            peak_memory=e.rank_memory, fits=e.fits, note=note, data_parallel=c.data_parallel,
            num_ranks=c.num_ranks, mesh_order=c.mesh_order, dp_allreduce_time=e.dp_allreduce_time,
        ))
    return tuple(out)


def _none_fits(result: SearchResult, devices_per_node: int, limit: int | None) -> PartitionError:
    del devices_per_node
    unfit = [e for e in result.ranked if not e.fits]
    if not unfit:
        return PartitionError(f"hybrid auto-plan: none of the {result.num_configs} configurations "
                              f"could be split or simulated; see the log for why")
    closest = min(unfit, key=lambda e: (max(e.rank_memory), e.step_time))
    return PartitionError(
        f"hybrid auto-plan: none of the {result.num_configs} configurations fits the "
        f"memory limit ({format_bytes(limit or 0)} per device); the closest is {closest.config.label}, which "
        f"needs {format_bytes(max(closest.rank_memory))}. To fix: more devices (deeper pipelines), a larger "
        "memory_limit, or fewer optimizer bytes per parameter"
    )


__all__ = [
    "MAX_CANDIDATES",
    "MICROBATCHES_PER_RANK",
    "HybridConfig",
    "Prepared",
    "candidates",
    "finish",
    "prepare_search",
    "check_data_parallel",
    "partition_data_parallel",
    "partition_hybrid",
    "partition_hybrid_auto",
    "plan_with_mesh",
    "price_data_parallel",
]
