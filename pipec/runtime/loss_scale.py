"""Losses normalised by a count: ``loss_fn`` returning ``(loss_sum, count)``.

Phase: stage runtime. The step's loss is ``sum(loss_sum) / sum(count)`` over
every micro-batch of the batch (:mod:`pipec.loss`), and its gradient
``sum(d loss_sum) / sum(count)``. The last stage only knows ``sum(count)``
after its last forward, but under 1F1B (and interleaved, ZB-H1) the first
backward runs long before that, so no per-micro-batch scale can be right up
front. Gradients are linear in the loss, so the executor backpropagates each
``loss_sum`` unscaled and, after the schedule, every rank divides *this step's*
gradients by the batch's count, which the last stage's rank broadcasts: exact
for every schedule, whatever the schedule's order, and independent of the
split. With D replicas (:mod:`pipec.runtime.mesh`) the count is broadcast inside
each pipeline and summed over the replicas: the global batch's count, by which the
replica-summed gradients are divided. Gradients accumulated by earlier steps (no ``zero_grad`` in between) are
set aside before the step and added back unscaled, as the tied-parameter
reducer does (:mod:`pipec.runtime.tied`); the division comes before the
tied-gradient all-reduce, which then sums already-normalised gradients.

Which kind of loss a ``loss_fn`` returns is learnt at the first training step
(one broadcast of ``(kind, count)``); later steps broadcast only for a count
loss, so a mean loss costs nothing. A ``loss_fn`` that changes kind between
steps is a :class:`~pipec.errors.ConfigError`. A count of 0 over the batch gives
NaN, as ``F.cross_entropy`` with every item ignored does on one process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from pipec.errors import ConfigError
from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.mesh import Mesh
from pipec.runtime.waiting import Waiter

MEAN, COUNT = "mean", "count"


class CountNormalizer:
    """Learns the loss kind and divides count-loss gradients by the batch's count.

    ``source`` is the rank of the last stage (it holds the counts); ``params``
    this rank's parameters, each once. Call :meth:`begin_step` before the
    schedule runs and :meth:`end_step` after it, before the tied-gradient
    all-reduce, then :meth:`restore`.
    """

    def __init__(
        self,
        *,
        info: ProcessGroupInfo,
        source: int,
        params: Callable[[], list[nn.Parameter]],
        waiter: Waiter,
        mesh: Mesh | None = None,
    ) -> None:
        self._info = info
        self._mesh = mesh
        self._source = source
        self._params = params
        self._waiter = waiter
        self.kind: str | None = None  # MEAN or COUNT once the first training step ran
        self._saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def begin_step(self) -> None:
        """Set aside the gradients of earlier steps unless the loss is known to be a mean."""
        self._saved = {}
        if self.kind == MEAN:
            return
        for p in self._params():
            if p.grad is not None:
                self._saved[id(p)] = (p, p.grad)
                p.grad = None

    def end_step(self, counts: Mapping[int, torch.Tensor], step: int) -> torch.Tensor | None:
        """Agree on the loss kind and the batch's count; divide this step's gradients by it.

        ``counts`` are the last stage's per-micro-batch counts (empty elsewhere
        and for a mean loss). Returns the batch's count for a count loss, else
        None. Collective (every rank calls it) unless the loss is a mean.
        """
        local = torch.stack([counts[m] for m in sorted(counts)]).sum() if counts else None
        is_source = self._info.rank == self._source  # global ranks
        if self.kind == MEAN:
            if is_source and local is not None:
                raise ConfigError(
                    f"step {step}: loss_fn returned (loss_sum, count), but a scalar loss at the first "
                    "training step; a runtime keeps the kind it saw first: return the same kind every step"
                )
            return None
        total = self._agree(local, is_source, step)
        if total is None:
            return None
        for p in self._params():
            if p.grad is not None:
                p.grad.div_(total.to(p.grad.dtype))
        return total

    def _agree(self, local: torch.Tensor | None, is_source: bool, step: int) -> torch.Tensor | None:
        """Broadcast ``[is_count, count]`` (first step) or ``[count]`` from the last stage's rank."""
        learning = self.kind is None
        device = self._info.device
        if is_source:
            # a scalar loss where a count loss was learnt sends NaN: the peers' gradients
            # turn NaN rather than silently wrong while this rank raises
            fill = 0.0 if learning else float("nan")
            count = local if local is not None else torch.full((), fill, dtype=torch.float64, device=device)
            message = torch.stack([torch.ones_like(count) if local is not None else torch.zeros_like(count),
                                   count]) if learning else count.reshape(1)
            message = message.to(device=device, dtype=torch.float64)
        else:
            message = torch.zeros(2 if learning else 1, dtype=torch.float64, device=device)
        mesh = self._mesh
        pipeline = mesh.pipeline_ranks() if mesh is not None else list(range(self._info.world_size))
        if self._info.distributed and len(pipeline) > 1:
            group = mesh.pp_group if mesh is not None else None
            work = dist.broadcast(message, src=self._source, group=group, async_op=True)
            if work is None:
                raise RuntimeError(f"broadcast on rank {self._info.rank} returned no request")
            peers = [self._source] if not is_source else [r for r in pipeline if r != self._source]
            self._waiter.wait_collective(work, peers, "the broadcast of the batch's loss count")
        if self._info.distributed and mesh is not None and mesh.dp_group is not None:
            # the global count: summed over the replicas (and the kind flag: > 0 for a count loss)
            work = dist.all_reduce(message, op=dist.ReduceOp.SUM, group=mesh.dp_group, async_op=True)
            if work is None:
                raise RuntimeError(f"all_reduce on rank {self._info.rank} returned no request")
            others = [r for r in mesh.replica_ranks() if r != self._info.rank]
            self._waiter.wait_collective(work, others, "the all-reduce of the loss count across replicas")
        if learning:
            self.kind = COUNT if bool(message[0].item() > 0) else MEAN
            if self.kind == MEAN:
                return None
            return message[1]
        if is_source and local is None:
            raise ConfigError(
                f"step {step}: loss_fn returned a scalar loss, but (loss_sum, count) at the first training "
                "step; a runtime keeps the kind it saw first: return the same kind every step"
            )
        return message[0]

    def restore(self) -> None:
        """Add the set-aside gradients of earlier steps back (unscaled)."""
        for p, before in self._saved.values():
            p.grad = before if p.grad is None else before.add_(p.grad)
        self._saved = {}
