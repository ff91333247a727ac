"""ZeRO-1 across the replicas: each stage's optimizer state sharded over its ``dp`` group.

Phase: stage runtime. ``pipe.optimizer(cls, zero=True, ...)`` (or
``PipelineRuntime(..., zero=1)``) wraps ``cls`` in
:class:`torch.distributed.optim.ZeroRedundancyOptimizer` over the process group
of the replicas holding this pipeline rank's stages (:mod:`pipec.runtime.mesh`)
-- Rajbhandari et al., "ZeRO", SC 2020, stage 1 (P_os). Each rank keeps the
optimizer state of about ``1 / D`` of its parameters (whole parameters,
assigned greedily by size), updates those and broadcasts them to the other
replicas after ``step()``; the gradients are still all-reduced whole
(:mod:`pipec.runtime.data_parallel`). Memory per rank: optimizer state drops
from ``optimizer_state_bytes_per_param x params`` to about that divided by D
(what the planner counts); the gradient and parameter memory stay; each step
adds one broadcast of the rank's parameters across the replicas.

Checkpoints stay one file set per stage: before replica 0 writes, the shards
are gathered onto it (:func:`consolidate`, collective over the group), and a
saved state loads into a ZeRO optimizer of any D or into a plain one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipec.errors import ConfigError


def zero_optimizer(
    params: Iterable[nn.Parameter], cls: Callable[..., torch.optim.Optimizer], group: dist.ProcessGroup | None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)`` with its state sharded over ``group`` (ZeRO-1)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ConfigError(f"zero=True needs an optimizer class (e.g. torch.optim.AdamW), found {cls!r}")
    found = list(params)
    if not found:
        raise ConfigError("zero=True: this rank holds no parameters to shard; use zero=False for this plan")
    return ZeroRedundancyOptimizer(found, optimizer_class=cls, process_group=group, **kwargs)


def is_zero(optimizer: object) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def consolidate(optimizer: torch.optim.Optimizer) -> None:
    """Gather a ZeRO optimizer's shards onto replica 0 (group rank 0); collective over its
    group: every replica calls it before replica 0 reads ``state_dict()``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)


__all__ = ["consolidate", "is_zero", "zero_optimizer"]
