"""Phase partition, entry point: what :func:`pipec.partition` runs.

Input: an ``nn.Module``, an example batch and the pipeline's shape. Output:
:class:`~pipec.partitioner.single.Partitioned` -- the plan data and the traced
graph, which the façade (:mod:`pipec.facade`) wraps in a :class:`pipec.Plan`.
The phases, in order::

    check arguments            (cheap; before any tracing)
    split the batch            (dim 0 -> num_microbatches equal micro-batches)
    trace one micro-batch      pipec.tracing.trace
    cost it                    cost model: "profile" | hardware name/path | CostModel
    partition_traced           chain problem -> solve -> plan data

Every cost, shape and boundary in the plan is per micro-batch;
``PlanData.batch_size`` records the full batch.
:func:`pipec.partitioner.single.partition_traced` is the single-configuration
step, which the automatic search (schedule / micro-batches / stages per rank =
"auto", :mod:`pipec.partitioner.auto`) calls in a loop.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipec.costs.recompute import check_request
from pipec.errors import ConfigError, PartitionError, ScheduleError
from pipec.mode_ops import describe_nodes
from pipec.partitioner import config
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.eval_random import draws_in_eval
from pipec.partitioner.inputs import (
    AUTO,
    batch_size,
    check_auto_arguments,
    check_loss_fn,
    default_microbatches,
    first_microbatch,
    first_target,
    split_inputs,
)
from pipec.partitioner.loss_check import check_loss_reduction
from pipec.partitioner.single import (
    Partitioned,
    check_strategy,
    make_schedule_checked,
    partition_traced,
    resolve_cost_model,
)
from pipec.plan import PlanData
from pipec.schedule.backends import BACKENDS, lower_for
from pipec.schedule.ir import Schedule
from pipec.types import CostModel, check_precision

log = logging.getLogger(__name__)


def partition_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    num_stages: int | None = None,
    num_microbatches: int | str | None = None,
    schedule: str | Schedule = "1f1b",
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
    data_parallel: int | str = 1,
    num_devices: int | None = None,
    devices_per_node: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
    zero: int = 0,
) -> Partitioned:
    """What :func:`pipec.partition` computes, as the plan data and the traced
    graph it splits (see that function for the arguments)."""
    precision = check_precision(precision)
    if isinstance(zero, bool) or zero not in (0, 1):
        raise ConfigError(f"zero: expected 0 (off) or 1 (ZeRO-1: the optimizer state sharded over the "
                          f"data-parallel replicas), found {zero!r}")
    if zero and (data_parallel == 1 or isinstance(data_parallel, bool)):
        raise ConfigError("zero=1 shards the optimizer state over data-parallel replicas; pass data_parallel=D "
                          "(D > 1) or data_parallel='auto' with it, or leave zero out for one pipeline")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a torch.nn.Module, found {type(model).__name__}; "
            "wrap a plain function in an nn.Module whose forward calls it"
        )
    if isinstance(data_parallel, bool) or data_parallel != 1 or num_devices is not None or devices_per_node is not None:
        from pipec.partitioner.hybrid import partition_hybrid

        check_loss_fn(loss_fn)
        check_request(recompute)
        if device_speeds is not None:
            raise ConfigError("device_speeds: not supported with data_parallel (replicas are priced on the cost "
                              "model's devices); leave device_speeds out, or plan one pipeline (data_parallel=1)")
        found = partition_hybrid(
            model, example_inputs, data_parallel=data_parallel, num_devices=num_devices,
            devices_per_node=devices_per_node, num_stages=num_stages, num_microbatches=num_microbatches,
            schedule=schedule, stages_per_rank=stages_per_rank, loss_fn=loss_fn, cost_model=cost_model,
            memory_limit=memory_limit, strategy=strategy, example_kwargs=example_kwargs, method=method,
            optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, leaf_modules=leaf_modules,
            target=target, precision=precision, recompute=recompute, zero=zero)
        warn_batch_norm(found.data)
        warn_mode_blind_random(found.data)
        return found
    if num_stages is None:
        raise ConfigError("num_stages: expected the number of pipeline stages (an int), found None; pass "
                          "num_stages=N, or data_parallel='auto' with num_devices=N to search it")
    check_auto_arguments(num_microbatches, schedule, stages_per_rank)
    check_request(recompute)
    check_loss_fn(loss_fn)
    if isinstance(schedule, str) and AUTO in (num_microbatches, schedule, stages_per_rank):
        from pipec.partitioner.auto import partition_auto

        found = partition_auto(
            model, example_inputs, num_stages=num_stages, num_microbatches=num_microbatches,
            schedule=schedule, stages_per_rank=stages_per_rank, loss_fn=loss_fn, cost_model=cost_model,
            memory_limit=memory_limit, device_speeds=device_speeds, strategy=strategy,
            example_kwargs=example_kwargs, method=method,
            optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, leaf_modules=leaf_modules,
            target=target, precision=precision, recompute=recompute,
        )
        args, kwargs = split_inputs(example_inputs, example_kwargs)
        if found.data.mode_blind_random and draws_in_eval(
                model, *first_microbatch(args, kwargs, found.data.num_microbatches)):
            found = Partitioned(found.data.model_copy(update={"mode_blind_random": {}}), found.traced)
        warn_batch_norm(found.data)
        warn_mode_blind_random(found.data)
        check_loss_reduction(model, args, kwargs, loss_fn=loss_fn, target=target,
                             num_microbatches=found.data.num_microbatches)
        return found
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
        num_microbatches = (schedule.num_microbatches if isinstance(schedule, Schedule)
                            else default_microbatches(batch, ranks))
    num_microbatches = config.count("num_microbatches", num_microbatches, high=batch,
                                    advice="" if batch is None else f" (the batch has {batch} samples along dim 0)")
    make_schedule_checked(schedule, num_stages, num_microbatches, stages_per_rank)
    mb_args, mb_kwargs = first_microbatch(args, kwargs, num_microbatches)

    from pipec.tracing import trace

    started = time.perf_counter()
    traced = trace(model, mb_args, mb_kwargs, method=method, leaf_modules=leaf_modules)
    model_costs = resolve_cost_model(cost_model, traced, loss_fn=loss_fn,
                                     target=first_target(target, num_microbatches), precision=precision)
    node_costs = model_costs.node_costs(traced)
    log.info("traced and costed %s (%d nodes) in %.2fs", traced.model_name, len(traced.nodes),
             time.perf_counter() - started)
    data = partition_traced(
        traced, node_costs, cost_model=model_costs, num_stages=num_stages,
        num_microbatches=num_microbatches, schedule=schedule, stages_per_rank=stages_per_rank,
        memory_limit=memory_limit, device_speeds=device_speeds, strategy=strategy,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, batch_size=batch,
        precision=precision,
        recompute=recompute,
    )
    check_runnable(data)
    if data.mode_blind_random and draws_in_eval(model, mb_args, mb_kwargs):
        data = data.model_copy(update={"mode_blind_random": {}})  # random in eval like the model: right
    warn_batch_norm(data)
    warn_mode_blind_random(data)
    check_loss_reduction(model, args, kwargs, loss_fn=loss_fn, target=target, num_microbatches=num_microbatches)
    return Partitioned(data, traced)


def check_runnable(data: PlanData) -> None:
    """Refuse now a plan no backend can run; warn when only some can.

    The plan stores one lowering per backend that can run its schedule
    (``data.lowered``, :func:`pipec.schedule.backends.lower_per_backend`); one
    missing means the schedule failed validation for it (a deadlock the dry run
    found). Tensors that skip stages across interleaved stages no longer make
    one (the runtime keeps each pair's message order per message), so this
    guards the rest. Raises :class:`PartitionError` when no backend can run the
    plan; warns (``UserWarning``) naming the backends that can when some cannot.
    (``schedule="auto"`` leaves such candidates out itself: it plans for NCCL.)
    """
    missing = [b for b in BACKENDS if b not in data.lowered]
    if not missing:
        return
    said = ""
    try:
        lower_for(data.schedule, data.boundaries, missing[0])
    except ScheduleError as exc:
        said = f" Lowering for {missing[0]} said: {str(exc).splitlines()[0]}"
    head = f"{data.schedule.name} with {data.stages_per_rank} stages per rank cannot run on {', '.join(missing)}"
    if not data.lowered:
        raise PartitionError(
            f"{head}: no backend can run this split. Use a schedule with one stage per rank "
            f"(schedule='1f1b' or 'zb-h1'), or schedule='auto', which leaves out what cannot run.{said}"
        )
    can = ", ".join(sorted(data.lowered))
    warnings.warn(
        f"{head}: this plan runs on {can} only (pipec run --backend {sorted(data.lowered)[0]}). For "
        f"{', '.join(missing)} use a schedule with one stage per rank (schedule='1f1b' or 'zb-h1') or "
        f"schedule='auto'.{said}",
        UserWarning, stacklevel=4,
    )


def warn_batch_norm(data: PlanData) -> None:
    """Warn that the plan's BatchNorm layers see one micro-batch at a time (when there are several)."""
    layers, num = data.batch_norm_layers, data.num_microbatches
    if layers and num > 1:
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        warnings.warn(
            f"{len(layers)} BatchNorm layer(s) ({shown}) normalise each of the {num} micro-batches "
            "alone: their batch statistics, running statistics and the gradients are those of "
            "micro-batch gradient accumulation, not of the full batch. For full-batch statistics "
            "use num_microbatches=1, or a per-sample norm (GroupNorm, LayerNorm).",
            UserWarning, stacklevel=4,
        )


def warn_mode_blind_random(data: PlanData) -> None:
    """Warn that the plan's random nodes with no mode argument draw in ``eval()`` too
    (the model was traced in training mode; see :func:`pipec.mode_ops.mode_blind_random`)."""
    if data.mode_blind_random:
        warnings.warn(
            f"{len(data.mode_blind_random)} random operation(s) ({describe_nodes(data.mode_blind_random)}) "
            "were traced in train() mode and have no train/eval argument to follow, so the stages "
            "draw them in eval() too. If the model's Python skips them in eval (stochastic depth: "
            "timm DropPath, torchvision StochasticDepth, `if not self.training: return x`), "
            "pipe.eval() and stage.eval() give random outputs: for inference, partition the model "
            "in eval mode, pipec.partition(model.eval(), ...).",
            UserWarning, stacklevel=4,
        )


__all__ = ["partition_model", "warn_batch_norm", "warn_mode_blind_random"]
