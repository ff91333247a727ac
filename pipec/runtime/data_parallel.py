"""Gradient all-reduce across the D replicas of a pipeline, per stage, bucketed, overlapped.

Phase: stage runtime. Every replica runs the same stages on its own share of
the global batch, so after a step each parameter's gradient must be summed
over the replicas (the ``dp`` process group of :mod:`pipec.runtime.mesh`: the
ranks holding this pipeline rank's stages). As DDP overlaps its all-reduce
with the backward pass (Li et al., "PyTorch Distributed", VLDB 2020, sec. 3.2.3),
:class:`DataParallelReducer` starts a stage's all-reduces as soon as that
stage's LAST backward action of the step is done -- its last ``B``, or the last
of its ``I`` and ``W`` under zero-bubble schedules (:func:`last_backward`) --
while this rank goes on with other stages' actions (interleaved schedules) and
the pipeline's drain. The gradients are flattened into buckets of at most
``bucket_bytes`` (one dtype each, parameters in reverse registration order:
roughly the order backward produces them) and each bucket is one asynchronous
``all_reduce``; :meth:`DataParallelReducer.finish` waits for them (through the
:class:`~pipec.runtime.waiting.Waiter`, so a failed peer stops the wait) and
writes the sums back before the step ends.

Tied parameters are left out: :class:`~pipec.runtime.tied.TiedGradReducer`
reduces each once over the union of its holders and their replicas, so no
gradient is summed twice. Whether the sum is divided by D (a mean loss) or by
the global item count (a ``(loss_sum, count)`` loss) is the runtime's
decision after the step (:mod:`pipec.runtime.loss_scale`).

Each all-reduce is recorded on the step's timeline as a span
``<stage>DP_ALLREDUCE`` from its start to when this rank saw it complete
(:data:`pipec.timeline_format.DP_ALLREDUCE`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipec.runtime.waiting import Waiter
from pipec.schedule.ir import Action, ActionKind
from pipec.timeline_format import DP_ALLREDUCE

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb

_BACKWARD_KINDS = (ActionKind.B, ActionKind.I, ActionKind.W)


def last_backward(actions: Sequence[Action]) -> dict[int, int]:
    """``{stage: index in actions}`` of each stage's last backward action (B, I or W):
    after it, the stage's parameter gradients of the step are final."""
    last: dict[int, int] = {}
    for i, a in enumerate(actions):
        if a.kind in _BACKWARD_KINDS:
            last[a.stage] = i
    return last


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    flat: torch.Tensor | None = None
    work: dist.Work | None = None
    started: Any = None


class DataParallelReducer:
    """Sums the gradients of this rank's stages over the replicas' ``group``.

    ``stages`` are this rank's stage modules (after
    :func:`~pipec.runtime.tied.share_local_parameters`), ``exclude`` the ``id``s of
    parameters reduced elsewhere (tied ones); a parameter used by several local
    stages is reduced with the stage whose backward ends last (``order``: local
    stages in the order their last backward runs). ``peers`` are the other
    replicas' global ranks (named when a wait fails). ``clock`` times the spans.
    """

    def __init__(
        self,
        stages: Mapping[int, nn.Module],
        *,
        order: Sequence[int],
        exclude: set[int],
        group: dist.ProcessGroup | None,
        peers: Sequence[int],
        waiter: Waiter,
        clock: Any = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self._group = group
        self._peers = list(peers)
        self._waiter = waiter
        self._clock = clock
        owner: dict[int, int] = {}
        params: dict[int, nn.Parameter] = {}
        rank_in_order = {s: i for i, s in enumerate(order)}
        for s in sorted(stages, key=lambda s: rank_in_order.get(s, -1)):
            for p in stages[s].parameters():
                if p.requires_grad and id(p) not in exclude:
                    owner[id(p)] = s  # the later stage wins
                    params[id(p)] = p
        self._buckets: dict[int, list[_Bucket]] = {}
        for s in stages:
            mine = [params[i] for i in reversed(list(params)) if owner[i] == s]
            self._buckets[s] = _buckets(mine, bucket_bytes)
        self._launched: list[tuple[int, _Bucket]] = []

    def params(self) -> list[nn.Parameter]:
        """Every parameter this reducer sums."""
        return [p for buckets in self._buckets.values() for b in buckets for p in b.params]

    def begin_step(self) -> None:
        self._launched = []

    def launch(self, stage: int) -> None:
        """Start the all-reduces of ``stage``'s buckets (its backward for the step is done)."""
        for bucket in self._buckets.get(stage, ()):
            grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                 device=p.device)
                     for p in bucket.params]
            bucket.flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
            bucket.started = self._clock.start() if self._clock is not None else None
            bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
            if bucket.work is None:
                raise RuntimeError("all_reduce of a data-parallel gradient bucket returned no request")
            self._launched.append((stage, bucket))

    def pending(self) -> bool:
        return bool(self._launched)

    def finish(self, on_span: Callable[[Any, str], None] | None = None) -> None:
        """Wait for every launched all-reduce and write the summed gradients back
        (a parameter with no gradient on any replica keeps none)."""
        launched, self._launched = self._launched, []
        for stage, bucket in launched:
            if bucket.work is None or bucket.flat is None:
                continue
            self._waiter.wait_collective(bucket.work, self._peers,
                                         f"the data-parallel gradient all-reduce of stage {stage}")
            if on_span is not None:
                on_span(bucket.started, f"{stage}{DP_ALLREDUCE}")
            offset = 0
            for p in bucket.params:
                part = bucket.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    p.grad.copy_(part)
                elif bool(part.any()):
                    p.grad = part.clone()
            bucket.flat, bucket.work = None, None


def _buckets(params: Sequence[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    """``params`` (in order) cut into buckets of one dtype and device, each at most
    ``bucket_bytes`` unless one parameter alone is larger."""
    out: list[_Bucket] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[_Bucket, int]] = {}
    for p in params:
        key = (p.dtype, p.device)
        size = p.numel() * p.element_size()
        current = open_.get(key)
        if current is None or (current[1] + size > bucket_bytes and current[0].params):
            bucket = _Bucket([])
            out.append(bucket)
            current = (bucket, 0)
        current[0].params.append(p)
        open_[key] = (current[0], current[1] + size)
    return out


__all__ = ["DEFAULT_BUCKET_BYTES", "DataParallelReducer", "last_backward"]
