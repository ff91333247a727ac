"""One yes/no answer for every rank: the MAX of a 0/1 flag over the process group.

Phase: stage runtime. Decisions that make ranks take different paths -- skip
the optimizer step after a non-finite gradient, save a checkpoint because
some minutes passed -- must be the same on every rank, or the ranks deadlock
(one waits in a collective the others skip) or drift apart (one updates, the
others do not). Each rank contributes its own flag; one all-reduce (MAX) of a
one-element tensor over the whole process group gives every rank the same
answer. The wait goes through the runtime's :class:`~pipec.runtime.waiting.Waiter`,
so a rank that died while the others wait is a ``PeerFailure``, not a hang.

The fp16 loss scaler (:mod:`pipec.runtime.amp`) takes its "found inf"
decision the same way; the non-finite check (:mod:`pipec.runtime.nonfinite`)
shares this function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.waiting import Waiter


def flag_tensor(info: ProcessGroupInfo) -> torch.Tensor:
    """A 0-flag on the group's device, for :func:`any_rank` (MAX into it with ``torch.maximum``)."""
    return torch.zeros((), dtype=torch.float32, device=info.device)


def any_rank(flag: bool | torch.Tensor, *, info: ProcessGroupInfo, waiter: Waiter, what: str) -> bool:
    """Whether ``flag`` holds on ANY rank (the same answer on every rank; collective: every
    rank calls it, in the same order). ``flag`` may be a tensor (0 or 1, any shape: its max),
    so a device-side flag is read back once, after the all-reduce."""
    value = flag.detach().float().max().reshape(()) if isinstance(flag, torch.Tensor) else torch.tensor(float(flag))
    value = value.to(info.device).clone()
    if info.distributed and info.world_size > 1:
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
        if work is None:
            raise RuntimeError(f"all_reduce on rank {info.rank} returned no request")
        peers = [r for r in range(info.world_size) if r != info.rank]
        waiter.wait_collective(work, peers, what)
    return bool(value.item() > 0)


__all__ = ["any_rank", "flag_tensor"]
