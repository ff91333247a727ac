"""``reference_step``: one pipelined training step, reproduced in one process.

Phase: stage runtime (no communication, no process group). Input: a plan (or
its directory), the full batch and the seed and step of a
:class:`~pipec.runtime.runtime.PipelineRuntime` step. Output: the step's mean
loss and every parameter's gradient under its original FQN.

It runs the plan's stage modules in order, one micro-batch at a time (each
forward in the same :func:`~pipec.split.randomness.random_scope` as the
runtime's), and backpropagates ``loss / num_microbatches`` per micro-batch (a ``(loss_sum,
count)`` loss: the sums, with the gradients divided by the batch's count).
Random operations draw from ``(seed, step, micro-batch, node)``, so this is
what every schedule and every stage layout computes: use it to check a
pipeline, or to debug one without torch.distributed. Batch norm normalises
each micro-batch alone, as in the pipeline. A plan of precision "bf16"/"fp16"
runs as its stages do: each stage under CPU autocast, float boundaries cast to
the plan's boundary dtype, the loss in float32 (fp16's loss scale is left out:
it is undone exactly unless a gradient overflows).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from pipec.costs.precision import autocast, cast_boundary, upcast_floats
from pipec.errors import ConfigError
from pipec.facade import Plan
from pipec.loss import LossParts, loss_parts
from pipec.microbatch import split_inputs, split_target
from pipec.runtime.setup import as_plan, resolve_seed
from pipec.runtime.tied import share_local_parameters
from pipec.split import StageModule
from pipec.split.randomness import random_scope


class ReferenceStep(NamedTuple):
    """The mean loss of the step and the gradient of each parameter by original FQN
    (a tied parameter once, its gradient summed over its users)."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def reference_step(
    plan_or_dir: Plan | str | os.PathLike[str],
    *inputs: Any,
    target: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    seed: int | None = None,
    step: int = 0,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> ReferenceStep:
    """What ``PipelineRuntime(plan, seed=seed).step(*inputs, target=target)`` computes
    after ``step`` earlier calls of its ``step`` or ``forward`` (or from a checkpoint
    of step ``step``), in this process.

    The stages are fresh from the plan (its weights, or ``state_dict``: a full
    state dict with the original FQNs) in the mode the model was traced in.
    ``loss_fn`` defaults to the plan's; ``seed`` to ``torch.initial_seed()``,
    as for the runtime.
    """
    plan = as_plan(plan_or_dir)
    loss_fn = loss_fn if loss_fn is not None else plan.loss_fn
    if loss_fn is None:
        raise ConfigError("reference_step needs a loss function: pass loss_fn, or partition with loss_fn=...")
    stages: dict[int, StageModule] = {}
    for k in range(plan.num_stages):
        module = copy.deepcopy(plan.stage_module(k))  # the plan keeps its own (the runtime's, in-process)
        if not isinstance(module, StageModule):
            raise ConfigError(f"stage {k} is a {type(module).__name__}, not a pipec StageModule")
        stages[k] = module
    params = share_local_parameters(dict(stages))
    if state_dict is not None:
        for module in stages.values():
            missing = [k for k in module.state_dict() if k not in state_dict]
            if missing:
                raise ConfigError(f"state_dict lacks {missing[:5]}; pass the full state dict of the model "
                                  "(original FQNs), e.g. pipec.merge_state_dicts of every rank's")
            module.load_state_dict({k: state_dict[k] for k in module.state_dict()})
    # the global batch of every replica: global micro-batch d * M + m is replica d's m-th
    num = plan.num_microbatches * plan.data.data_parallel
    values = plan.flatten_inputs(inputs, kwargs)
    microbatches = split_inputs(values, plan.data.inputs, num, torch.device("cpu"))
    targets = split_target(target, num, torch.device("cpu")) if target is not None else None
    seed = resolve_seed(seed)
    losses: list[LossParts] = []
    precision = plan.data.precision
    crossing = {b.name: b.meta.torch_dtype for b in plan.data.boundaries}
    for m, graph_inputs in enumerate(microbatches):
        known: dict[str, Any] = dict(graph_inputs)
        output: Any = None
        with random_scope(seed, step, m):
            for k in range(plan.num_stages):
                stage = stages[k]
                with autocast("cpu", precision):
                    result: tuple[Any, ...] = stage(*[known[n] for n in stage.input_names])
                known.update((n, cast_boundary(t, crossing[n], precision)) for n, t in zip(stage.output_names, result))
                if k == plan.num_stages - 1:
                    output = result[-1] if precision == "fp32" else upcast_floats(result[-1])
        parts = loss_parts(loss_fn(output) if targets is None else loss_fn(output, targets[m]))
        # a mean loss is scaled per micro-batch; a (loss_sum, count) loss is summed and the
        # step's gradients divided by the batch's count at the end, as the runtime does
        scaled = parts.loss if parts.num_items is not None else parts.loss / num
        torch.autograd.backward(scaled)
        losses.append(LossParts(parts.loss.detach(), parts.num_items))
    counted = [p.num_items is not None for p in losses]
    if any(counted) and not all(counted):
        raise ConfigError("loss_fn returned a (loss_sum, count) pair for some micro-batches and a "
                          "scalar for others; return the same kind of value on every call")
    total = torch.stack([p.num_items for p in losses if p.num_items is not None]).sum() if all(counted) else None
    seen: set[int] = set()
    grads: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if id(p) not in seen and p.grad is not None:
            seen.add(id(p))
            grads[name] = p.grad if total is None else p.grad / total.to(p.grad.dtype)
    if total is None:
        return ReferenceStep(torch.stack([p.loss for p in losses]).mean(), grads)
    return ReferenceStep((torch.stack([p.loss for p in losses]).sum() / total).to(losses[0].loss.dtype), grads)


__all__ = ["ReferenceStep", "reference_step"]
