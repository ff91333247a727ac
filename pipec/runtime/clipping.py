"""Gradient clipping by the norm of the whole pipeline's gradient.

Phase: stage runtime, after :meth:`PipelineRuntime.step`. Clipping each
stage's gradients by its own norm (``torch.nn.utils.clip_grad_norm_`` on
``pipe.parameters()``) silently trains a different model: the norm must be
that of the whole model's gradient. Each rank sums ``|g|^p`` over the
parameters it counts (a tied parameter, whose gradient the tied all-reduce made
equal on every holder, only on its lowest holder rank), one all-reduce over
the pipeline's process group (SUM; MAX for the infinity norm) gives the
total, and every rank scales its gradients exactly as
``torch.nn.utils.clip_grad_norm_`` would on the single-process model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from pipec.errors import ConfigError
from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.waiting import Waiter


def check_norm_type(norm_type: float) -> float:
    """``norm_type`` as a float, or ConfigError when it is not > 0 or inf."""
    value = float(norm_type)
    if math.isnan(value) or value <= 0:
        raise ConfigError(
            f"clip_grad_norm_ needs a norm_type > 0 or inf (2.0 by default), got {norm_type!r}; "
            "pass e.g. norm_type=2.0 or norm_type=float('inf')"
        )
    return value


def local_norm_part(grads: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """This rank's share of the global norm, in float64 on ``device``: the sum of
    ``|g|^p`` over ``grads`` (their maximum ``|g|`` for the infinity norm); 0 for none."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type).to(device=device, dtype=torch.float64)
                         for g in grads])
    if math.isinf(norm_type):
        return norms.max()
    return norms.pow(norm_type).sum()


def global_grad_norm(
    grads: Sequence[torch.Tensor],
    norm_type: float,
    *,
    info: ProcessGroupInfo,
    waiter: Waiter,
    group: dist.ProcessGroup | None = None,
    ranks: Sequence[int] | None = None,
) -> torch.Tensor:
    """The ``norm_type``-norm of the gradients counted on all ranks together
    (collective: every rank of the pipeline calls it; ``group`` / ``ranks``: the
    pipeline's process group and its global ranks, default the whole world -- with
    replicas, whose gradients are equal after the step, one pipeline's norm is the model's), a scalar on this rank's device. ``grads`` are the gradients this rank counts (each tied one on
    one rank only). Float64: accumulated in double precision, cast by the caller."""
    norm_type = check_norm_type(norm_type)
    part = local_norm_part(grads, norm_type, info.device)
    members = list(ranks) if ranks is not None else list(range(info.world_size))
    if info.distributed and len(members) > 1:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        work = dist.all_reduce(part, op=op, group=group, async_op=True)
        if work is None:
            raise RuntimeError(f"all_reduce on rank {info.rank} returned no request")
        peers = [r for r in members if r != info.rank]
        waiter.wait_collective(work, peers, "the all-reduce of the gradient norm (clip_grad_norm_)")
    total = part if math.isinf(norm_type) else part.pow(1.0 / norm_type)
    return total


def scale_grads(grads: Iterable[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale ``grads`` in place by ``min(1, max_norm / (total + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_`` does (a non-finite ``total`` makes them NaN there too)."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(device=g.device, dtype=g.dtype))
