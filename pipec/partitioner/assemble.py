"""Phase partition: a split of the chain as :class:`pipec.plan.PlanData`, and manual splits.

Input: a :class:`~pipec.partitioner.graph.GraphChain`, its costed solution and
the schedule. Output: the plan data -- one :class:`StageInfo` per stage, a
:class:`Boundary` per tensor that crosses stages (sent straight from its
producer stage to every later stage that reads it), a :class:`TiedGroup` per
parameter used on several stages, the graph inputs, bottleneck and lower bound.

:func:`plan_from_split` builds the whole :class:`~pipec.plan.PlanData` from split
points chosen by hand (tests, the runtime, users who know better).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pipec.costs.recompute import options_of
from pipec.errors import ConfigError, PartitionError
from pipec.mode_ops import batch_norm_layers, mode_blind_random
from pipec.partitioner import config
from pipec.partitioner.chain import (
    check_cuts,
    evaluate,
    stage_params,
    stage_policy,
    stage_recompute_time,
    stage_tied_time,
)
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.graph import (
    GraphChain,
    Split,
    build_chain,
    compute_names,
    is_plain_tensor,
    split_to_cuts,
)
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem, ChainSolution
from pipec.plan import Boundary, InputSpec, PlanData, StageInfo, TiedGroup, holder_ranks
from pipec.schedule.backends import lower_per_backend
from pipec.schedule.in_flight import (
    held_for_weight_grad,
    in_backward_from_schedule,
    in_flight_from_schedule,
)
from pipec.schedule.ir import Schedule
from pipec.types import (
    CostModel,
    NodeCost,
    RuntimeOverhead,
    TracedGraph,
    boundary_meta,
    check_precision,
)


def build_plan_data(
    chain: GraphChain,
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    solution: ChainSolution,
    *,
    schedule: Schedule,
    strategy: str,
    cost_model_name: str,
    batch_size: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
    runtime_overhead: RuntimeOverhead | None = None,
) -> PlanData:
    """The plan data of ``solution`` (see the module docstring). Each stage's recompute
    policy is the one the stage cost chose (:func:`pipec.partitioner.chain.stage_policy`);
    its seconds go into the stage's backward (``B``, or ``I`` under the split)."""
    problem = chain.problem
    cuts = np.asarray(solution.cuts, dtype=np.int64)
    infos = {n.name: n for n in traced.nodes}
    fx_nodes = {n.name: n for n in traced.graph_module.graph.nodes}

    def stage_of(position: int) -> int:
        return int(np.searchsorted(cuts, position, side="right")) - 1

    tied = []
    for fqn, group in zip(chain.param_fqns, problem.params):
        holders = sorted({stage_of(u) for u in group.users})
        if len(holders) > 1 and not group.is_buffer:
            ranks = holder_ranks(holders, problem.rank_of)
            tied.append(TiedGroup(fqn=fqn, aliases=traced.params[fqn].aliases, stages=tuple(holders),
                                  num_bytes=group.num_bytes,
                                  allreduce_time=problem.exchange_time(group.num_bytes, ranks)))
    reported = tied_shares(tied, problem.num_stages, problem.rank_of, problem.num_microbatches)
    stages = []
    for k in range(problem.num_stages):
        i, j = solution.cuts[k], solution.cuts[k + 1]
        names = chain.names[i:j]
        speed = problem.speed_of(k)
        forward = sum(node_costs[n].forward_time for n in names) / speed
        input_grad = sum(node_costs[n].input_grad_time for n in names) / speed
        weight_grad = sum(node_costs[n].weight_grad_time for n in names) / speed
        policy = stage_policy(problem, k, i, j)
        if recompute not in ("none", "auto"):
            check_recomputable(k, names, policy, node_costs, problem, i, j)
        extra = stage_recompute_time(problem, k, i, j)
        input_grad += extra
        backward = sum(node_costs[n].backward_time for n in names) / speed + extra
        numel, param_bytes = stage_params(problem, i, j)
        # the search's own tied charge comes off; the real groups' share goes on
        charged = stage_tied_time(problem, k, i, j)
        stages.append(StageInfo(
            index=k, rank=problem.rank_of(k), nodes=names, num_params=numel, param_bytes=param_bytes,
            forward_time=forward, backward_time=backward,
            comm_time=max(0.0, solution.stage_times[k] - forward - backward - charged),
            tied_time=reported[k], memory_bytes=solution.stage_memory[k],
            input_grad_time=input_grad, weight_grad_time=weight_grad,
            recompute=policy, recompute_time=extra, kept_bytes=kept_bytes(problem, policy, i, j),
            first_module=infos[names[0]].module_path, last_module=infos[names[-1]].module_path,
        ))
    boundaries: list[Boundary] = []
    for name, tensor in zip(chain.tensor_names, problem.tensors):
        source = stage_of(tensor.producer)
        readers = sorted({stage_of(c) for c in tensor.consumers} - {source})
        if readers:
            meta = boundary_meta(infos[name].outputs[0], precision)  # what crosses (as build_chain costed it)
            boundaries.append(Boundary(name=name, producer_stage=source, consumer_stages=tuple(readers),
                                       shape=meta.shape, dtype=meta.dtype, num_bytes=meta.num_bytes,
                                       transfer_times=transfer_times(problem, meta.num_bytes, source, readers)))
    held = gloo_extra_bytes(boundaries, problem.rank_of, problem.num_stages, problem.num_microbatches,
                            [int(f) for f in tables_of(problem).in_flight])  # as memory_bytes counts them
    stages = [st.model_copy(update={"gloo_memory_bytes": st.memory_bytes + held[st.index]}) for st in stages]
    inputs = tuple(
        InputSpec(name=n.name, meta=n.outputs[0] if is_plain_tensor(n, fx_nodes) and n.outputs else None)
        for n in traced.nodes if n.op == "placeholder"
    )
    return PlanData(
        model_name=traced.model_name, trace_method=traced.method,
        num_stages=problem.num_stages, num_ranks=problem.ranks,
        stages_per_rank=problem.num_stages // problem.ranks,
        num_microbatches=problem.num_microbatches, batch_size=batch_size,
        strategy=strategy, cost_model=cost_model_name, schedule=schedule,
        lowered=lower_per_backend(schedule, boundaries),
        stages=tuple(stages), boundaries=tuple(boundaries),
        node_costs={n.name: node_costs[n.name] for n in traced.nodes if n.name in node_costs},
        tied_groups=tuple(tied), inputs=inputs, input_structure=traced.input_structure,
        memory_limit=tuple(problem.limit_of(r) for r in range(problem.ranks)),
        device_speeds=tuple(problem.speed_of(r) for r in range(problem.ranks)),
        optimizer_state_bytes_per_param=problem.optimizer_state_bytes_per_param, precision=precision,
        recompute=recompute,
        bottleneck=solution.bottleneck, lower_bound=lower_bound(chain, node_costs),
        node_modules={n.name: n.module_path for n in traced.nodes if n.name in set(chain.names)},
        batch_norm_layers=batch_norm_layers(traced.graph_module, {n.name: n.module_path for n in traced.nodes}),
        mode_blind_random=mode_blind_random(traced.graph_module, {n.name: n.module_path for n in traced.nodes})
        if traced.training else {},
        runtime_overhead=runtime_overhead,
    )


def gloo_extra_bytes(boundaries: Sequence[Boundary], rank_of: Callable[[int], int], num_stages: int,
                     num_microbatches: int, in_flight: Sequence[int]) -> list[int]:
    """Per stage, the bytes a run on Gloo holds beyond the plan's (NCCL) prediction.

    A Gloo send completes only once waited for (``Work.is_completed()`` stays False
    until then), so the runtime keeps every tensor it sends until the step ends
    (:meth:`pipec.runtime.comm.P2P.wait_sends`): each forward output sent to another
    rank for all ``m`` micro-batches, not only those in flight, and each gradient sent
    back for a received floating tensor, ``m`` of them. On NCCL a completed send is
    dropped at the next transfer."""
    m = num_microbatches
    out = [0] * num_stages
    for b in boundaries:
        remote = [c for c in b.consumer_stages if rank_of(c) != rank_of(b.producer_stage)]
        if not remote:
            continue
        out[b.producer_stage] += b.num_bytes * max(0, m - in_flight[b.producer_stage])
        if b.is_floating:
            for c in remote:
                out[c] += b.num_bytes * m
    return out


def kept_bytes(problem: ChainProblem, policy: str, start: int, end: int) -> int:
    """Activation bytes positions ``[start, end)`` keep per micro-batch in flight under ``policy``."""
    tab = tables_of(problem)
    return int(tab.prefix_kept[policy][end] - tab.prefix_kept[policy][start])


def check_recomputable(stage: int, names: Sequence[str], policy: str, node_costs: Mapping[str, NodeCost],
                       problem: ChainProblem, start: int, end: int) -> None:
    """PartitionError when ``policy`` (asked for every stage) has nothing to recompute on
    ``stage``: it would neither free a byte nor cost a second."""
    tab = tables_of(problem)
    freed = int(tab.prefix_saved[end] - tab.prefix_saved[start]) - int(
        tab.prefix_kept[policy][end] - tab.prefix_kept[policy][start])
    if policy != "none" and freed <= 0 and stage_recompute_time(problem, stage, start, end) <= 0:
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        raise PartitionError(
            f"recompute={policy!r}: stage {stage} ({shown}) has no nodes to recompute -- its nodes "
            f"keep no activations that {policy} recompute would drop (matmul-like nodes are kept "
            "under 'selective'); use recompute='auto', which leaves such stages at 'none'"
        )


def runtime_overhead_of(cost_model: object) -> RuntimeOverhead | None:
    """A cost model's :class:`~pipec.types.RuntimeOverhead` (its hardware file's), or
    None for one that has none (a user's own cost model)."""
    found = getattr(cost_model, "runtime_overhead", None)
    return found if isinstance(found, RuntimeOverhead) else None


def transfer_times(problem: ChainProblem, num_bytes: int, producer: int, consumers: Sequence[int]) -> tuple[float, ...]:
    """Seconds for ``num_bytes`` to go from stage ``producer`` to each of ``consumers``
    over the link between their ranks, once (0 on one rank or without a comm model)."""
    src = problem.rank_of(producer)
    return tuple(
        0.0 if problem.comm_time is None or problem.rank_of(c) == src
        else float(problem.comm_time(num_bytes, src, problem.rank_of(c)))
        for c in consumers
    )


def tied_shares(
    groups: Sequence[TiedGroup], num_stages: int, rank_of: Callable[[int], int], num_microbatches: int
) -> list[float]:
    """Per stage, its share per micro-batch of the all-reduces its rank joins:
    ``allreduce_time / num_microbatches`` of each group held on two ranks or more,
    on the first of the group's stages on each of those ranks (a rank joins once).

    The search charges a two-rank all-reduce to every stage with a tied user
    elsewhere (it cannot know the other holders' ranks while it places one
    stage); the plan reports what the runtime does.
    """
    out = [0.0] * num_stages
    for g in groups:
        ranks = g.ranks(rank_of)
        if len(ranks) > 1 and g.allreduce_time is not None:
            for r in ranks:
                first = min(k for k in g.stages if rank_of(k) == r)
                out[first] += g.allreduce_time / num_microbatches
    return out


def lower_bound(chain: GraphChain, node_costs: Mapping[str, NodeCost]) -> float:
    """``max(total / sum of stage speeds, largest node / fastest speed)``:
    ``max(total / num_stages, largest node)`` on equal devices."""
    problem = chain.problem
    times = [node_costs[n].total_time for n in chain.names]
    speeds = [problem.speed_of(k) for k in range(problem.num_stages)]
    return max(sum(times) / sum(speeds), max(times) / max(speeds))


def given_schedule(schedule: Schedule, num_stages: int, num_microbatches: int, stages_per_rank: int) -> Schedule:
    """``schedule`` (compute-only) once it matches the sizes asked for and validates."""
    from pipec.schedule.validator import validate  # the schedule library sits below

    found = (schedule.num_stages, schedule.num_microbatches, schedule.stages_per_rank)
    if found != (num_stages, num_microbatches, stages_per_rank):
        raise ConfigError(
            f"schedule {schedule.name!r}: expected num_stages={num_stages}, num_microbatches="
            f"{num_microbatches}, stages_per_rank={stages_per_rank}, found num_stages={found[0]}, "
            f"num_microbatches={found[1]}, stages_per_rank={found[2]} in the schedule; pass the sizes "
            "the schedule was built for"
        )
    compute = schedule.compute_only()
    validate(compute)
    return compute


def plan_from_split(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    split: Split,
    *,
    schedule: str | Schedule = "1f1b",
    num_microbatches: int = 1,
    stages_per_rank: int = 1,
    cost_model: CostModel | None = None,
    memory_limit: MemoryLimit = None,
    device_speeds: Sequence[float] | None = None,
    optimizer_state_bytes_per_param: int = 8,
    batch_size: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
) -> PlanData:
    """The plan data of a split given by hand (wrap it as ``pipec.Plan(data, traced=traced)``).
    ``precision``: as in :func:`pipec.partition` (the boundaries' dtype and bytes).

    ``split``: node-name lists (one per stage), interior cut positions
    (``num_stages - 1`` ints into the compute nodes), or names of the nodes
    that start stages 1, 2, ... Memory limits are recorded, not enforced.
    """
    from pipec.schedule.generators import make_schedule

    cuts = split_to_cuts(compute_names(traced), split)
    num_stages = len(cuts) - 1
    ranks = config.num_ranks(num_stages, stages_per_rank)
    sched = (given_schedule(schedule, num_stages, num_microbatches, stages_per_rank)
             if isinstance(schedule, Schedule) else make_schedule(schedule, num_stages, num_microbatches, stages_per_rank))
    chain = build_chain(
        traced, node_costs, num_stages=num_stages, num_ranks=ranks,
        comm_time=cost_model.comm_time if cost_model is not None else None,
        allreduce_time=config.allreduce_time(cost_model),
        device_speeds=config.device_speeds(device_speeds, ranks),
        memory_limit=config.memory_limits(memory_limit, ranks, cost_model),
        schedule=sched.name, num_microbatches=num_microbatches, in_flight=in_flight_from_schedule(sched),
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
        placement=sched.placement, precision=check_precision(precision),
        recompute=options_of(recompute), in_backward=in_backward_from_schedule(sched),
        held_grads=held_for_weight_grad(sched),
    )
    solution = evaluate(chain.problem, check_cuts(chain.problem, cuts), "manual")
    data = build_plan_data(chain, traced, node_costs, solution, schedule=sched, strategy="manual",
                           cost_model_name=cost_model.name if cost_model is not None else "given",
                           batch_size=batch_size, precision=precision, recompute=recompute,
                           runtime_overhead=runtime_overhead_of(cost_model))
    return data


__all__ = ["build_plan_data", "gloo_extra_bytes", "lower_bound", "plan_from_split", "tied_shares"]
