"""Phase partition, entry point: :func:`pipec.partition`.

Input: an ``nn.Module``, an example batch and the pipeline's shape. Output: a
:class:`pipec.plan.Plan`. The phases, in order::

    check arguments            (cheap; before any tracing)
    split the batch            (dim 0 -> num_microbatches equal micro-batches)
    trace one micro-batch      pipec.tracing.trace
    cost it                    cost model: "profile" | hardware name/path | CostModel
    partition_traced           chain problem -> solve -> plan data

Every cost, shape and boundary in the plan is per micro-batch;
``PlanData.batch_size`` records the full batch. :func:`partition_traced` is
the single-configuration step an automatic search (schedule / micro-batches
/ stages per rank = "auto") calls in a loop.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pipec.errors import ConfigError, PartitionError
from pipec.partitioner import config
from pipec.partitioner.algorithm import STRATEGIES, solve
from pipec.partitioner.assemble import build_plan_data
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.graph import GraphChain, build_chain
from pipec.plan import Plan
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.schedule.ir import Schedule
from pipec.types import CostModel, NodeCost, TracedGraph

log = logging.getLogger(__name__)

AUTO = "auto"


def partition(
    model: nn.Module,
    example_inputs: Any,
    *,
    num_stages: int,
    num_microbatches: int | str | None = None,
    schedule: str = "1f1b",
    stages_per_rank: int | str = 1,
    loss_fn: Callable[..., Any] | None = None,
    cost_model: str | Path | CostModel = "profile",
    memory_limit: MemoryLimit = None,
    device_speeds: Sequence[float] | None = None,
    strategy: str = "optimal",
    example_kwargs: Mapping[str, Any] | None = None,
    method: str = "auto",
    optimizer_state_bytes_per_param: int = 8,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    target: Any = None,
) -> Plan:
    """Split ``model`` into ``num_stages`` pipeline stages with the smallest bottleneck.

    ``example_inputs`` (a tuple of positional arguments, or one tensor) and
    ``example_kwargs`` form one full batch; every tensor in them is split
    along dim 0 into ``num_microbatches`` micro-batches (default: the largest
    divisor of the batch that is at most ``2 * num_ranks``). The model is
    traced and costed on one micro-batch. ``memory_limit`` (a size such as
    ``"80GiB"``, or one per rank) defaults to the cost model's memory capacity.

    ``schedule``, ``num_microbatches`` and ``stages_per_rank`` may each be
    ``"auto"``: :func:`pipec.partitioner.auto.partition_auto` then searches them
    and keeps the fastest simulated configuration that fits memory (see that
    module for how ``num_stages`` is read when ``stages_per_rank="auto"``).

    ``loss_fn`` with ``target`` (the full batch's, split like the inputs; without
    it ``loss_fn(output)`` is called) is profiled with the model when
    ``cost_model="profile"``, and its time and memory count on the last stage.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a torch.nn.Module, found {type(model).__name__}; "
            "wrap a plain function in an nn.Module whose forward calls it"
        )
    check_auto_arguments(num_microbatches, schedule, stages_per_rank)
    check_loss_fn(loss_fn)
    if AUTO in (num_microbatches, schedule, stages_per_rank):
        from pipec.partitioner.auto import partition_auto

        return warn_batch_norm(partition_auto(
            model, example_inputs, num_stages=num_stages, num_microbatches=num_microbatches,
            schedule=schedule, stages_per_rank=stages_per_rank, loss_fn=loss_fn, cost_model=cost_model,
            memory_limit=memory_limit, device_speeds=device_speeds, strategy=strategy,
            example_kwargs=example_kwargs, method=method,
            optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, leaf_modules=leaf_modules,
            target=target,
        ))
    config.count("num_stages", num_stages)
    stages_per_rank = config.count("stages_per_rank", stages_per_rank)
    ranks = config.num_ranks(num_stages, stages_per_rank)
    check_strategy(strategy)
    config.device_speeds(device_speeds, ranks)
    if memory_limit is not None:
        config.memory_limits(memory_limit, ranks, None)
    config.count("optimizer_state_bytes_per_param", optimizer_state_bytes_per_param, low=0)
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    batch = batch_size(args, kwargs)
    if num_microbatches is None:
        num_microbatches = default_microbatches(batch, ranks)
    num_microbatches = config.count("num_microbatches", num_microbatches, high=batch,
                                    advice="" if batch is None else f" (the batch has {batch} samples along dim 0)")
    make_schedule_checked(schedule, num_stages, num_microbatches, stages_per_rank)
    mb_args, mb_kwargs = first_microbatch(args, kwargs, num_microbatches)

    from pipec.tracing import trace

    started = time.perf_counter()
    traced = trace(model, mb_args, mb_kwargs, method=method, leaf_modules=leaf_modules)
    model_costs = resolve_cost_model(cost_model, traced, loss_fn=loss_fn,
                                     target=first_target(target, num_microbatches))
    node_costs = model_costs.node_costs(traced)
    log.info("traced and costed %s (%d nodes) in %.2fs", traced.model_name, len(traced.nodes),
             time.perf_counter() - started)
    return warn_batch_norm(partition_traced(
        traced, node_costs, cost_model=model_costs, num_stages=num_stages,
        num_microbatches=num_microbatches, schedule=schedule, stages_per_rank=stages_per_rank,
        memory_limit=memory_limit, device_speeds=device_speeds, strategy=strategy,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, batch_size=batch,
        loss_fn=loss_fn,
    ))


def warn_batch_norm(plan: Plan) -> Plan:
    """Warn that the plan's BatchNorm layers see one micro-batch at a time (when there are several)."""
    layers, num = plan.data.batch_norm_layers, plan.data.num_microbatches
    if layers and num > 1:
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        warnings.warn(
            f"{len(layers)} BatchNorm layer(s) ({shown}) normalise each of the {num} micro-batches "
            "alone: their batch statistics, running statistics and the gradients are those of "
            "micro-batch gradient accumulation, not of the full batch. For full-batch statistics "
            "use num_microbatches=1, or a per-sample norm (GroupNorm, LayerNorm).",
            UserWarning, stacklevel=3,
        )
    return plan


def partition_traced(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    *,
    num_stages: int,
    num_microbatches: int,
    schedule: str = "1f1b",
    stages_per_rank: int = 1,
    cost_model: CostModel | None = None,
    memory_limit: MemoryLimit = None,
    device_speeds: Sequence[float] | None = None,
    strategy: str = "optimal",
    optimizer_state_bytes_per_param: int = 8,
    batch_size: int | None = None,
    loss_fn: Callable[..., Any] | None = None,
) -> Plan:
    """One configuration: the plan for a traced, costed graph (no tracing, no profiling)."""
    check_strategy(strategy)
    sched = make_schedule_checked(schedule, num_stages, num_microbatches, stages_per_rank)
    chain = chain_for(traced, node_costs, sched, cost_model=cost_model, memory_limit=memory_limit,
                      device_speeds=device_speeds,
                      optimizer_state_bytes_per_param=optimizer_state_bytes_per_param)
    started = time.perf_counter()
    solution = solve(chain.problem, strategy)
    log.info("%s split of %d nodes into %d stages in %.2fs: bottleneck %.3g s",
             strategy, chain.problem.num_nodes, num_stages, time.perf_counter() - started,
             solution.bottleneck)
    data = build_plan_data(chain, traced, node_costs, solution, schedule=sched, strategy=strategy,
                           cost_model_name=cost_model.name if cost_model is not None else "given",
                           batch_size=batch_size)
    return Plan(data, traced=traced, loss_fn=loss_fn)


def chain_for(
    traced: TracedGraph,
    node_costs: Mapping[str, NodeCost],
    sched: Schedule,
    *,
    cost_model: CostModel | None,
    memory_limit: MemoryLimit,
    device_speeds: Sequence[float] | None,
    optimizer_state_bytes_per_param: int,
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
    )


def check_auto_arguments(num_microbatches: object, schedule: object, stages_per_rank: object) -> None:
    """ConfigError for a string other than ``"auto"`` where a count or a schedule name goes."""
    from pipec.schedule.generators import SCHEDULE_NAMES

    for name, value in (("num_microbatches", num_microbatches), ("stages_per_rank", stages_per_rank)):
        if isinstance(value, str) and value != AUTO:
            raise ConfigError(f"{name}: expected a whole number or 'auto', found {value!r}; "
                              f"pass e.g. {name}=4, or 'auto' to search it")
    if schedule != AUTO and schedule not in SCHEDULE_NAMES:
        raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULE_NAMES)} or 'auto', "
                          f"found {schedule!r}; pass one of these names")


def check_strategy(strategy: object) -> None:
    if strategy not in STRATEGIES:
        raise PartitionError(f"strategy: expected one of {', '.join(STRATEGIES)}, found {strategy!r}; "
                             "pass strategy='optimal' (the default) or one of the baselines")


def check_loss_fn(loss_fn: object) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn: expected a callable loss_fn(output, target) -> scalar tensor, "
                          f"found {type(loss_fn).__name__}; pass e.g. torch.nn.functional.cross_entropy")


def make_schedule_checked(name: object, num_stages: int, num_microbatches: int, stages_per_rank: int) -> Any:
    """The compute-only schedule; an unknown name is a ConfigError listing the known ones."""
    from pipec.schedule.generators import SCHEDULE_NAMES, make_schedule

    if not isinstance(name, str) or name not in SCHEDULE_NAMES:
        raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULE_NAMES)}, found {name!r}; "
                          "pass one of these names")
    return make_schedule(name, num_stages, num_microbatches, stages_per_rank)


def resolve_cost_model(cost_model: object, traced: TracedGraph, *, loss_fn: Callable[..., Any] | None = None,
                       target: Any = None) -> CostModel:
    """``"profile"`` (measure here, the loss too when ``loss_fn`` is given; ``target`` is
    one micro-batch's), a hardware name or JSON path, or a CostModel object."""
    if isinstance(cost_model, CostModel):
        return cost_model
    if cost_model == "profile":
        from pipec.costs.profiled import ProfiledCostModel
        from pipec.profiling import profile

        return ProfiledCostModel(profile(traced, loss_fn=loss_fn, target=target))
    if isinstance(cost_model, (str, Path)):
        from pipec.costs.analytic import load_cost_model

        if loss_fn is not None:
            log.info("the analytic cost model %s does not cost the loss; profile (cost_model='profile') "
                     "to count it on the last stage", cost_model)
        return load_cost_model(cost_model)
    raise ConfigError(
        f"cost_model: expected 'profile', a name in cost_models/ such as 'h100-sxm', a JSON path or "
        f"a CostModel object, found {type(cost_model).__name__}"
    )


def split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as a tuple of positional arguments (a list, or one value, is
    wrapped), and ``example_kwargs`` as a dict."""
    args = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ConfigError(
            f"example_kwargs: expected a dict of keyword arguments for forward, found "
            f"{type(example_kwargs).__name__}; pass e.g. example_kwargs={{'attention_mask': mask}}, "
            "or put positional inputs in example_inputs"
        )
    return args, dict(example_kwargs or {})


def _tensor_leaves(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path((args, dict(kwargs)))
    return [(pytree.keystr(path), x) for path, x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """Dim 0 of the first tensor input (None without tensor inputs)."""
    tensors = _tensor_leaves(args, kwargs)
    return int(tensors[0][1].shape[0]) if tensors else None


def default_microbatches(batch: int | None, num_ranks: int) -> int:
    """The largest divisor of ``batch`` that is at most ``2 * num_ranks`` (1 without a batch)."""
    if batch is None:
        return 1
    return max(d for d in range(1, min(batch, 2 * num_ranks) + 1) if batch % d == 0)


def first_target(target: Any, num_microbatches: int) -> Any:
    """Micro-batch 0 of ``target`` (None stays None), split as the runtime splits it."""
    if target is None:
        return None
    from pipec.runtime.microbatch import split_target

    return split_target(target, num_microbatches, torch.device("cpu"))[0]


def first_microbatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], num_microbatches: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Micro-batch 0: every tensor input with a dim 0 cut into ``num_microbatches`` equal parts."""
    for where, tensor in _tensor_leaves(args, kwargs):
        size = int(tensor.shape[0])
        if size % num_microbatches:
            divisors = [d for d in range(1, size + 1) if size % d == 0]
            raise ConfigError(
                f"num_microbatches: {num_microbatches} does not divide the batch of input {where} "
                f"(dim 0 = {size}); use one of {divisors}, or a batch that {num_microbatches} divides"
            )
    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    parts = [x.chunk(num_microbatches, dim=0)[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
             for x in leaves]
    mb_args, mb_kwargs = pytree.tree_unflatten(parts, spec)
    return tuple(mb_args), dict(mb_kwargs)


__all__ = ["AUTO", "batch_size", "chain_for", "check_auto_arguments", "default_microbatches",
           "first_microbatch", "first_target", "partition", "partition_traced", "resolve_cost_model", "split_inputs"]
