"""Tied parameters: one tensor per rank, gradients summed across the ranks holding it.

Phase: stage runtime. A parameter used by several stages (a tied input
embedding and output head) is a copy in each stage module under its canonical
FQN (:class:`pipec.plan.TiedGroup`). Stages on the same rank are made to share
one ``nn.Parameter`` (:func:`share_local_parameters`), so their gradients add up
by themselves; across ranks :class:`TiedGradReducer` sums each step's gradient
over a small process subgroup of the holders, so every holder sees the full
gradient and an optimizer keeps the copies equal. With D replicas
(:mod:`pipec.runtime.mesh`) the subgroup is every holder in every replica, so
the gradient is summed once over holders and replicas (the data-parallel
reducer leaves tied parameters out). The all-reduce is
asynchronous and waited for through the runtime's
:class:`~pipec.runtime.waiting.Waiter`, so a failed peer stops it too.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipec.errors import PlanError
from pipec.plan import TiedGroup
from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.mesh import Mesh
from pipec.runtime.waiting import Waiter


def _set_parameter(module: nn.Module, fqn: str, param: nn.Parameter) -> None:
    prefix, _, leaf = fqn.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    setattr(owner, leaf, param)


def share_local_parameters(stages: Mapping[int, nn.Module]) -> dict[str, nn.Parameter]:
    """Make this rank's stages that hold the same FQN use one parameter object.

    Returns FQN -> parameter for every local parameter, each object once under
    the first name it was found by (stages in order); a stage that also holds
    it under an alias name gets the shared object there too.
    """
    canonical: dict[str, nn.Parameter] = {}
    for s in sorted(stages):
        module = stages[s]
        named = list(module.named_parameters(remove_duplicate=False))
        replace: dict[int, nn.Parameter] = {}
        for name, p in named:
            first = canonical.get(name)
            if first is not None and first is not p:
                if first.shape != p.shape:
                    raise PlanError(
                        f"parameter {name!r} has shape {tuple(first.shape)} on one stage and "
                        f"{tuple(p.shape)} on stage {s}; the stage modules are inconsistent, re-create the plan"
                    )
                replace[id(p)] = first
        for name, p in named:
            if id(p) in replace:
                _set_parameter(module, name, replace[id(p)])
        known = {id(p) for p in canonical.values()}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in known:
                canonical[name] = p
                known.add(id(p))
    return canonical


class TiedGradReducer:
    """Sums the gradients of tied parameters over the ranks that hold them.

    Construction is collective: every rank must build it with the same groups,
    because creating a process subgroup is.
    """

    def __init__(
        self,
        tied_groups: Sequence[TiedGroup],
        *,
        rank_of: Callable[[int], int],
        info: ProcessGroupInfo,
        params: Mapping[str, nn.Parameter],
        waiter: Waiter | None = None,
        timeout: float | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        # (parameter, group, the group's other global ranks, the other holders' pipeline ranks)
        self._groups: list[tuple[nn.Parameter, dist.ProcessGroup | None, list[int], list[int]]] = []
        self._saved: list[torch.Tensor | None] = []
        self._waiter = waiter
        self._timeout = timeout if timeout is not None else 300.0
        self._rank = info.rank
        self._pp_rank = mesh.pp_rank if mesh is not None else info.rank
        for g in tied_groups:  # the same order on every rank
            holders = list(g.ranks(rank_of))  # pipeline ranks
            # with D replicas: one group of every holder in every replica, so the gradient is
            # summed once over holders and replicas (the data-parallel reducer leaves it out)
            ranks = holders if mesh is None else sorted(
                mesh.global_rank(h, d) for h in holders for d in range(mesh.data_parallel))
            if len(ranks) < 2 or not info.distributed:
                continue
            try:  # collective: waits (for ``timeout`` at most) for every rank of the group
                if timeout is None:
                    group = dist.new_group(ranks)
                else:
                    group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout))
            except Exception as exc:  # a peer that died or failed: name it, not the store key
                if waiter is None or info.rank not in ranks:
                    raise
                peer = next(r for r in ranks if r != info.rank)
                raise waiter.failure(peer, f"creating the process group of tied parameter {g.fqn!r} "
                                          f"(ranks {ranks})", exc) from exc
            if info.rank not in ranks:
                continue
            param = params.get(g.fqn)
            if param is None:
                raise PlanError(
                    f"tied parameter {g.fqn!r} should live on rank {info.rank} (stages {list(g.stages)}) "
                    "but no local stage module has it; re-create the plan"
                )
            self._groups.append((param, group, [r for r in ranks if r != info.rank],
                                 [h for h in holders if h != self._pp_rank]))

    def begin_step(self) -> None:
        """Set aside gradients accumulated before this step, so only this step's are summed."""
        self._saved = []
        for p, _, _, _ in self._groups:
            self._saved.append(p.grad)
            p.grad = None

    def end_step(self, scale: float | None = None) -> None:
        """Sum this step's gradients across holders (and replicas), multiply the sum by
        ``scale`` when given (``1 / D`` for a mean loss over D replicas) and add back the
        set-aside ones."""
        saved = self._saved or [None] * len(self._groups)
        for (p, group, peers, _), before in zip(self._groups, saved):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group, async_op=True)
            if work is None:
                raise RuntimeError(f"all_reduce on rank {self._rank} returned no request")
            if self._waiter is not None:
                self._waiter.wait_collective(work, peers, "the tied-gradient all-reduce")
            else:
                work.wait(datetime.timedelta(seconds=self._timeout))
            if scale is not None:
                grad.mul_(scale)
            p.grad = grad if before is None else before.add_(grad)
        self._saved = []

    def counted_elsewhere(self) -> set[int]:
        """``id``s of this rank's tied parameters whose gradient a lower rank also holds:
        after :meth:`end_step` every holder has the same summed gradient, so a norm over
        the whole pipeline counts it once, on its lowest holder rank."""
        return {id(p) for p, _, _, holders in self._groups if holders and min(holders) < self._pp_rank}

    def param_ids(self) -> set[int]:
        """``id``s of the parameters this reducer sums (left out of the data-parallel one)."""
        return {id(p) for p, _, _, _ in self._groups}

    def __len__(self) -> int:
        return len(self._groups)
