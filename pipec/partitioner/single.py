"""Phase partition, one configuration: the plan data of a traced, costed graph.

Input: a :class:`~pipec.types.TracedGraph`, its node costs, the cost model
and one configuration (schedule, micro-batches, stages per rank, memory
limits). Output: :class:`~pipec.plan.PlanData` (the façade,
:func:`pipec.partition`, wraps it in a :class:`pipec.Plan`). The phases, in order::

    make_schedule_checked      the compute-only schedule
    chain_for                  chain problem (in-flight micro-batches from the schedule)
    solve                      the split (pipec.partitioner.algorithm)
    build_plan_data            plan data (pipec.partitioner.assemble)
    synthesized                schedule="synth" only: the schedule built from the split's own
                               costs (pipec.schedule.synth), the split kept, the plan rebuilt

:func:`partition_traced` is the step :func:`pipec.partition` takes once and the
automatic search (:mod:`pipec.partitioner.auto`) takes per configuration.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pipec.costs.recompute import check_request, options_of
from pipec.errors import ConfigError, PartitionError, ScheduleError
from pipec.partitioner import config
from pipec.partitioner.algorithm import STRATEGIES, solve
from pipec.partitioner.assemble import build_plan_data, given_schedule, runtime_overhead_of
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.graph import GraphChain, build_chain
from pipec.plan import PlanData
from pipec.schedule.gen_common import SYNTH
from pipec.schedule.generators import FIXED_NAMES, SCHEDULE_NAMES, make_schedule
from pipec.schedule.in_flight import (
    held_for_weight_grad,
    in_backward_from_schedule,
    in_flight_from_schedule,
)
from pipec.schedule.ir import Schedule
from pipec.types import CostModel, NodeCost, TracedGraph, check_precision

log = logging.getLogger(__name__)


def partition_traced(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    *,
    num_stages: int,
    num_microbatches: int,
    schedule: str | Schedule = "1f1b",
    stages_per_rank: int = 1,
    cost_model: CostModel | None = None,
    memory_limit: MemoryLimit = None,
    device_speeds: Sequence[float] | None = None,
    strategy: str = "optimal",
    optimizer_state_bytes_per_param: int = 8,
    batch_size: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
) -> PlanData:
    """One configuration: the plan data for a traced, costed graph (no tracing, no profiling).
    ``precision`` sets the boundaries' dtype and bytes and the plan's autocast dtype; the
    node costs must already be those of that precision (:func:`resolve_cost_model`).
    ``recompute``: ``"none"``, ``"full"``, ``"selective"`` on every stage, or ``"auto"``
    (the search picks each stage's policy with the split; :mod:`pipec.partitioner.algorithm`)."""
    check_strategy(strategy)
    check_request(recompute)
    precision = check_precision(precision)
    synth = schedule == SYNTH
    if synth:
        schedule = synth_base(stages_per_rank)
    sched = make_schedule_checked(schedule, num_stages, num_microbatches, stages_per_rank)
    chain = chain_for(traced, node_costs, sched, cost_model=cost_model, memory_limit=memory_limit,
                      device_speeds=device_speeds,
                      optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, precision=precision,
                      recompute=recompute)
    started = time.perf_counter()
    solution = solve(chain.problem, strategy)
    log.info("%s split of %d nodes into %d stages in %.2fs: bottleneck %.3g s",
             strategy, chain.problem.num_nodes, num_stages, time.perf_counter() - started,
             solution.bottleneck)
    data = build_plan_data(chain, traced, node_costs, solution, schedule=sched, strategy=strategy,
                           cost_model_name=cost_model.name if cost_model is not None else "given",
                           batch_size=batch_size, precision=precision, recompute=recompute,
                           runtime_overhead=runtime_overhead_of(cost_model))
    if synth:
        data = synthesized(data, traced, node_costs, solution.cuts, strategy=strategy,
                           cost_model=cost_model, memory_limit=memory_limit, device_speeds=device_speeds,
                           optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
                           batch_size=batch_size, precision=precision, recompute=recompute)
    return data


def synth_base(stages_per_rank: int) -> str:
    """The fixed schedule a ``synth`` plan is split for, whose memory it keeps: ``zb-h1``
    with one stage per rank, ``zb-v`` with two (the V), else ``interleaved-zb``."""
    return {1: "zb-h1", 2: "zb-v"}.get(stages_per_rank, "interleaved-zb")


def synthesized(
    data: PlanData, traced: TracedGraph, node_costs: Mapping[str, NodeCost],
    cuts: Sequence[int], *, strategy: str, cost_model: CostModel | None, memory_limit: MemoryLimit,
    device_speeds: Sequence[float] | None, optimizer_state_bytes_per_param: int, batch_size: int | None,
    precision: str = "fp32",
    recompute: str = "none",
) -> PlanData:
    """``data`` (split for :func:`synth_base`'s schedule) with the schedule built from its
    stages' own F, I, W and boundary transfer times (:func:`pipec.schedule.synth.synthesize`).

    Memory: each fixed schedule of the same placement whose micro-batches in flight fit
    every rank's limit on this split (the base always does: the split was made for it) is
    a memory level; synth is built under each maximal level's in-flight counts and the
    fastest kept, so it is never slower in simulation than any fixed schedule that fits.
    The plan's memory is then recomputed for the schedule chosen."""
    from pipec.partitioner.chain import evaluate, fits
    from pipec.schedule.simulator import plan_costs, plan_transfers
    from pipec.schedule.synth import Synthesis, synthesize

    def solved(sched: Schedule) -> tuple[GraphChain, Any]:
        found_chain = chain_for(traced, node_costs, sched, cost_model=cost_model, memory_limit=memory_limit,
                                device_speeds=device_speeds,
                                optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
                                precision=precision, recompute=recompute)
        return found_chain, evaluate(found_chain.problem, cuts, strategy)

    levels = {data.schedule.name: in_flight_from_schedule(data.schedule)}
    for name in FIXED_NAMES:
        try:
            fixed = make_schedule(name, data.num_stages, data.num_microbatches, data.stages_per_rank)
        except ScheduleError:
            continue
        if name in levels or fixed.placement != data.schedule.placement:
            continue
        level_chain, level_solution = solved(fixed)
        if fits(level_chain.problem, level_solution):
            levels[name] = in_flight_from_schedule(fixed)
    maximal = {name: caps for name, caps in levels.items()
               if not any(other != caps and all(a <= b for a, b in zip(caps, other)) for other in levels.values())}
    costs, held = plan_costs(data)
    built: list[tuple[str, Synthesis]] = []
    for name, caps in maximal.items():
        built.append((name, synthesize(
            data.num_stages, data.num_microbatches, data.stages_per_rank,
            forward=costs.forward, input_grad=costs.input_grad, weight_grad=costs.weight_grad,
            comm=costs.comm, transfers=plan_transfers(data), boundaries=data.boundaries,
            max_in_flight=caps, activation_bytes=held,
        )))
    if not built:  # cannot happen: the base schedule's level is always there
        raise PartitionError("schedule='synth': no memory level to build the schedule under; report this")
    # The caps bound micro-batches in flight; what else a rank holds depends on the order
    # (gradients kept between a micro-batch's I and its W), so the fastest schedule whose
    # plan fits every rank's limit is kept -- never one over the limit.
    for level, found in sorted(built, key=lambda item: item[1].simulation.step_time):
        final_chain, solution = solved(found.schedule)
        if fits(final_chain.problem, solution):
            break
        log.info("schedule='synth': the order built within %s's memory holds more than a rank's limit "
                 "(gradients kept for W); trying the next", level)
    else:
        log.warning("schedule='synth': no synthesised order fits every rank's memory limit on this split; "
                    "the plan runs %s, the fixed schedule its split was made for", data.schedule.name)
        return data
    log.info("schedule='synth': built within %s's memory (%s), %.4g s simulated", level,
             ", ".join(maximal), found.simulation.step_time)
    if not found.heuristic_won:
        log.warning("schedule='synth': no greedy order or local search beat the fixed schedule %r on this "
                    "split; the plan runs its order (named synth)", found.source)
    return build_plan_data(final_chain, traced, node_costs, solution, schedule=found.schedule, strategy=strategy,
                           cost_model_name=cost_model.name if cost_model is not None else "given",
                           batch_size=batch_size, precision=precision, recompute=recompute,
                           runtime_overhead=runtime_overhead_of(cost_model))


def chain_for(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    sched: Schedule,
    *,
    cost_model: CostModel | None,
    memory_limit: MemoryLimit,
    device_speeds: Sequence[float] | None,
    optimizer_state_bytes_per_param: int,
    precision: str = "fp32",
    recompute: str = "none",
) -> GraphChain:
    """The chain problem of one configuration (the schedule fixes stages, ranks, micro-batches)."""
    ranks = config.num_ranks(sched.num_stages, sched.stages_per_rank)
    return build_chain(
        traced, node_costs, num_stages=sched.num_stages, num_ranks=ranks,
        comm_time=cost_model.comm_time if cost_model is not None else None,
        allreduce_time=config.allreduce_time(cost_model),
        device_speeds=config.device_speeds(device_speeds, ranks),
        memory_limit=config.memory_limits(memory_limit, ranks, cost_model),
        schedule=sched.name, num_microbatches=sched.num_microbatches,
        in_flight=in_flight_from_schedule(sched),
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
        placement=sched.placement, precision=precision,
        recompute=options_of(recompute), in_backward=in_backward_from_schedule(sched),
        held_grads=held_for_weight_grad(sched),
    )


def check_strategy(strategy: object) -> None:
    if strategy not in STRATEGIES:
        raise PartitionError(f"strategy: expected one of {', '.join(STRATEGIES)}, found {strategy!r}; "
                             "pass strategy='optimal' (the default) or one of the baselines")


def make_schedule_checked(name: object, num_stages: int, num_microbatches: int, stages_per_rank: int) -> Any:
    """The compute-only schedule; an unknown name is a ConfigError listing the known ones.

    A :class:`~pipec.schedule.ir.Schedule` given instead of a name (a hand-written
    one, a V-shaped placement) is validated and used as it is, its communication
    dropped: the plan lowers it once."""
    if isinstance(name, Schedule):
        return given_schedule(name, num_stages, num_microbatches, stages_per_rank)
    if name == SYNTH:
        name = synth_base(stages_per_rank)  # the split's schedule; partition_traced builds synth on it
    if not isinstance(name, str) or name not in FIXED_NAMES:
        raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULE_NAMES)}, found {name!r}; "
                          "pass one of these names")
    return make_schedule(name, num_stages, num_microbatches, stages_per_rank)


class Partitioned(NamedTuple):
    """What partitioning a model gives: the plan data and the traced graph it splits."""

    data: PlanData
    traced: TracedGraph


def resolve_cost_model(cost_model: object, traced: TracedGraph, *, loss_fn: Callable[..., Any] | None = None,
                       target: Any = None, precision: str = "fp32") -> CostModel:
    """``"profile"`` (measure here, the loss too when ``loss_fn`` is given; ``target`` is
    one micro-batch's), a hardware name or JSON path, or a CostModel object.

    ``precision``: the profiler measures under that precision's autocast, and an
    analytic model counts its kernels under it (each kernel priced at its dtype's
    peak FLOP/s); a CostModel object of your own is used as it is (it is yours to
    cost in the precision you plan for)."""
    if isinstance(cost_model, CostModel):
        with_precision = getattr(cost_model, "with_precision", None)
        if precision != "fp32" and callable(with_precision):
            return with_precision(precision)  # type: ignore[no-any-return]
        measured = getattr(getattr(cost_model, "profile", None), "precision", precision)
        if measured != precision:
            warnings.warn(
                f"the cost model {cost_model.name} was profiled in {measured} but the plan is {precision}: "
                f"its times and activation bytes are {measured}'s; profile with "
                f"pipec.profile(..., precision={precision!r}) or pass cost_model='profile'",
                UserWarning, stacklevel=4,
            )
        return cost_model
    if cost_model == "profile":
        from pipec.costs.profiled import ProfiledCostModel
        from pipec.profiling import profile

        return ProfiledCostModel(profile(traced, loss_fn=loss_fn, target=target, precision=precision))
    if isinstance(cost_model, (str, Path)):
        from pipec.costs.analytic import load_cost_model

        if loss_fn is not None:
            log.info("the analytic cost model %s does not cost the loss; profile (cost_model='profile') "
                     "to count it on the last stage", cost_model)
        return load_cost_model(cost_model, precision=precision)
    raise ConfigError(
        f"cost_model: expected 'profile', a name in cost_models/ such as 'h100-sxm', a JSON path or "
        f"a CostModel object, found {type(cost_model).__name__}"
    )


__all__ = [
    "Partitioned",
    "chain_for",
    "check_strategy",
    "make_schedule_checked",
    "partition_traced",
    "resolve_cost_model",
    "synth_base",
    "synthesized",
]
