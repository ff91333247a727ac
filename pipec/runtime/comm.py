"""Process-group setup and the point-to-point transfers of boundary tensors.

Phase: stage runtime. :func:`init_process_group` joins (or starts, from the
torchrun environment variables) the process group the plan needs: Gloo on CPU,
NCCL when CUDA is available, one device per local rank. :class:`P2P` moves the
tensors of :mod:`pipec.runtime.routing` between ranks with ``isend``/``irecv``
into receive buffers preallocated once from the plan's per-micro-batch boundary
shapes and reused every step. Sends are asynchronous and kept alive until they
complete; a receive action blocks until its data is in.

On Gloo every receive of a step is posted ahead, early in the step
(:meth:`P2P.post_receives`; where exactly: the executor's
``_early_receives``): Gloo moves a message only once its receiver has
posted the matching receive (the receiver notifies the sender, then the data
follows), so a receive posted at the moment it is needed puts that
notification's round trip on the critical path of every transfer; posted
early, the data lands as soon as it is sent. Each (stage, message,
micro-batch) has its own buffer, so early receives never overwrite data in
use. NCCL runs a pair's operations in issue order on one stream, where an
early receive would block the sends queued behind it: there receives are
posted when their action runs.

Every message has a deterministic tag (boundary, destination stage,
micro-batch, direction) so Gloo matches messages by tag. NCCL ignores tags and
matches messages between a pair of ranks in issue order, which the lowering
pass and the order documented in :mod:`pipec.runtime.routing` guarantee.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipec.errors import ConfigError
from pipec.plan import Boundary
from pipec.runtime.routing import StageRoutes, boundary_index
from pipec.runtime.waiting import Request, Waiter

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

FORWARD, BACKWARD = 0, 1


@dataclass(frozen=True)
class ProcessGroupInfo:
    """This process's place in the pipeline. ``distributed`` is False only for a
    one-rank plan run without any process group."""

    rank: int
    world_size: int
    backend: str | None
    device: torch.device
    distributed: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_process_group(
    num_ranks: int,
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: float | None = None,
) -> ProcessGroupInfo:
    """Join the default process group, initialising it from torchrun's variables if needed
    (with ``timeout`` seconds for its collectives and store operations).

    Raises :class:`ConfigError` outside a process group (unless the plan has a
    single rank, which runs without one), when the group's size differs from
    ``num_ranks``, or when NCCL is asked for without CUDA.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ConfigError(f"backend: expected 'gloo' or 'nccl' (or None to choose), found {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; use backend='gloo'")
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; install a build with distributed support")
    if dist.is_initialized():
        distributed = True
    elif all(v in os.environ for v in _TORCHRUN_VARS):
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if timeout is None:
            dist.init_process_group(chosen)
        else:
            dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout))
        log.info("initialised %s process group from the torchrun environment", chosen)
        distributed = True
    elif num_ranks == 1:
        distributed = False
    else:
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise ConfigError(
            f"PipelineRuntime needs a torch.distributed process group of {num_ranks} ranks, but none "
            f"is initialised and the torchrun variables {missing} are not set; launch with "
            f"`pipec run DIR --nproc {num_ranks}` or `torchrun --nproc-per-node {num_ranks} ...`, "
            "or call torch.distributed.init_process_group first"
        )
    if distributed:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        group_backend: str | None = str(dist.get_backend())
    else:
        rank, world_size, group_backend = 0, 1, None
    if world_size != num_ranks:
        raise ConfigError(
            f"the plan runs on {num_ranks} ranks but the process group has {world_size}; "
            f"launch {num_ranks} processes (`pipec run DIR --nproc {num_ranks}`) or re-plan for "
            f"{world_size} ranks (num_stages / stages_per_rank)"
        )
    if device is None:
        if group_backend == "nccl":
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            dev = torch.device("cpu")
    else:
        dev = torch.device(device)
    if group_backend == "nccl" and dev.type != "cuda":
        raise ConfigError(f"the process group uses NCCL, which needs a CUDA device, but device is {dev}")
    if group_backend == "gloo" and dev.type == "cuda":
        log.warning("Gloo on CUDA tensors copies through host memory; prefer backend='nccl'")
    return ProcessGroupInfo(rank, world_size, group_backend, dev, distributed)


def _irecv(buf: torch.Tensor, src: int, tag: int) -> dist.Work:
    work = dist.irecv(buf, src=src, tag=tag)
    if work is None:
        raise RuntimeError(f"irecv from rank {src} returned no request; is this rank in the process group?")
    return work


@dataclass(frozen=True)
class _Message:
    name: str
    peer_stage: int  # the other end: destination on send, source on receive
    peer_rank: int
    boundary: Boundary
    tag_base: int  # tag without the micro-batch and direction
    shape: tuple[int, ...]  # the boundary's, looked up once (the hot path reads these)
    dtype: torch.dtype


class P2P:
    """Point-to-point transfers of one rank's stages, with preallocated buffers.

    ``routes`` are this rank's stages; ``rank_of`` maps any stage to its rank.
    """

    def __init__(
        self,
        info: ProcessGroupInfo,
        routes: Mapping[int, StageRoutes],
        *,
        boundaries: Sequence[Boundary],
        rank_of: Callable[[int], int],
        num_stages: int,
        num_microbatches: int,
        waiter: Waiter,
    ) -> None:
        self.info = info
        self.rank_of = rank_of
        self.num_microbatches = num_microbatches
        self.waiter = waiter
        self._use_tags = info.backend != "nccl"
        self._pending: list[tuple[dist.Work, int, torch.Tensor]] = []
        index = boundary_index(boundaries)
        me = info.rank

        def msg(name: str, peer: int, b: Boundary, consumer: int) -> _Message:
            return _Message(name, peer, rank_of(peer), b, index[name] * num_stages + consumer,
                            tuple(b.shape), b.meta.torch_dtype)

        self._send_f: dict[int, list[_Message]] = {}
        self._recv_f: dict[int, list[_Message]] = {}
        self._send_b: dict[int, list[_Message]] = {}
        self._recv_b: dict[int, list[_Message]] = {}
        for s, r in routes.items():
            self._send_f[s] = sorted(
                (msg(o.name, c, o.boundary, c) for o in r.outputs for c in o.consumers if rank_of(c) != me),
                key=lambda m: (m.peer_stage, index[m.name]),
            )
            self._recv_b[s] = sorted(
                (
                    msg(o.name, c, o.boundary, c)
                    for o in r.outputs
                    if o.carries_grad
                    for c in o.consumers
                    if rank_of(c) != me
                ),
                key=lambda m: (m.peer_stage, index[m.name]),
            )
            remote_in = [i for i in r.boundary_inputs() if i.producer is not None and rank_of(i.producer) != me]
            self._recv_f[s] = sorted(
                (msg(i.name, i.producer, i.boundary, s) for i in remote_in if i.boundary and i.producer is not None),
                key=lambda m: (m.peer_stage, index[m.name]),
            )
            grad_in = {i.name for i in remote_in if i.carries_grad}
            self._send_b[s] = [m for m in self._recv_f[s] if m.name in grad_in]
        # one receive buffer per (stage, message, micro-batch), reused across steps
        self._fbuf = {
            (s, m.name, m.peer_stage, mb): self._empty(m)
            for s, msgs in self._recv_f.items()
            for m in msgs
            for mb in range(num_microbatches)
        }
        self._bbuf = {
            (s, m.name, m.peer_stage, mb): self._empty(m)
            for s, msgs in self._recv_b.items()
            for m in msgs
            for mb in range(num_microbatches)
        }
        self._zeros: dict[str, torch.Tensor] = {}
        # receives posted ahead of their action: (direction, stage, micro-batch) -> requests
        self._posted: dict[tuple[int, int, int], list[Request]] = {}

    def _empty(self, m: _Message) -> torch.Tensor:
        return torch.empty(m.shape, dtype=m.dtype, device=self.info.device)

    def _tag(self, m: _Message, microbatch: int, direction: int) -> int:
        if not self._use_tags:
            return 0
        return (m.tag_base * self.num_microbatches + microbatch) * 2 + direction

    def has_forward_sends(self, stage: int) -> bool:
        return bool(self._send_f.get(stage))

    # -- receives posted ahead -------------------------------------------
    def post_receives(self, receives: Sequence[tuple[int, int, int]]) -> None:
        """Post the step's receives ``(direction, stage, micro-batch)`` now, so their
        data moves as soon as the peer sends it; no-op on NCCL (see the module doc)."""
        if not self._use_tags:
            return
        self._posted.clear()
        for direction, stage, microbatch in receives:
            self._posted[(direction, stage, microbatch)] = self._post(direction, stage, microbatch)

    def discard_posted(self) -> None:
        """Forget receives posted for a step that ended early (its process group is
        being torn down); their buffers are not read again."""
        self._posted.clear()

    def _messages(self, direction: int, stage: int, microbatch: int) -> list[tuple[_Message, torch.Tensor]]:
        """``stage``'s incoming messages in one direction, each with its receive buffer."""
        msgs, bufs = (self._recv_f, self._fbuf) if direction == FORWARD else (self._recv_b, self._bbuf)
        return [(m, bufs[(stage, m.name, m.peer_stage, microbatch)]) for m in msgs[stage]]

    def _post(self, direction: int, stage: int, microbatch: int) -> list[Request]:
        return [(_irecv(buf, m.peer_rank, self._tag(m, microbatch, direction)), m.peer_rank)
                for m, buf in self._messages(direction, stage, microbatch)]

    def _receive(self, direction: int, stage: int, microbatch: int) -> list[Request]:
        posted = self._posted.pop((direction, stage, microbatch), None)
        return posted if posted is not None else self._post(direction, stage, microbatch)

    # -- forward ---------------------------------------------------------
    def send_forward(self, stage: int, microbatch: int, outputs: Mapping[str, torch.Tensor]) -> None:
        for m in self._send_f[stage]:
            self._isend(outputs[m.name], m, microbatch, FORWARD)

    def recv_forward(self, stage: int, microbatch: int) -> dict[str, torch.Tensor]:
        """Receive every remote input of ``stage`` for ``microbatch``; returns the buffers."""
        works = self._receive(FORWARD, stage, microbatch)
        out = {m.name: buf for m, buf in self._messages(FORWARD, stage, microbatch)}
        self.waiter.wait(works, f"receiving the inputs of stage {stage} for micro-batch {microbatch}")
        return out

    # -- backward --------------------------------------------------------
    def send_backward(self, stage: int, microbatch: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Send the gradients of ``stage``'s remote inputs; a missing gradient is sent as zeros."""
        for m in self._send_b[stage]:
            g = grads.get(m.name)
            if g is None:
                g = self._zeros.get(m.name)
                if g is None:
                    g = self._zeros[m.name] = torch.zeros(m.shape, dtype=m.dtype, device=self.info.device)
            # the consumer of the message is ``stage``; tag it like the forward message
            self._isend(g, m, microbatch, BACKWARD)

    def recv_backward(self, stage: int, microbatch: int) -> dict[tuple[str, int], torch.Tensor]:
        """Receive the gradients of ``stage``'s outputs from remote consumers,
        keyed by (boundary name, consumer stage)."""
        works = self._receive(BACKWARD, stage, microbatch)
        out = {(m.name, m.peer_stage): buf for m, buf in self._messages(BACKWARD, stage, microbatch)}
        self.waiter.wait(works, f"receiving the output gradients of stage {stage} for micro-batch {microbatch}")
        return out

    # -- bookkeeping -----------------------------------------------------
    def _isend(self, tensor: torch.Tensor, m: _Message, microbatch: int, direction: int) -> None:
        b = m.boundary
        t = tensor.detach()
        if t.shape != m.shape or t.dtype != m.dtype:
            what = "tensor" if direction == FORWARD else "gradient of"
            raise RuntimeError(
                f"{what} {m.name!r} for micro-batch {microbatch}: the plan expects shape {m.shape} "
                f"{b.dtype}, found {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}; shapes "
                "must not depend on the data, re-plan with inputs shaped like the real batch"
            )
        t = t.contiguous()
        dst = m.peer_rank
        work = dist.isend(t, dst=dst, tag=self._tag(m, microbatch, direction))
        if work is None:
            raise RuntimeError(f"isend to rank {dst} returned no request; is this rank in the process group?")
        self._pending.append((work, dst, t))
        if len(self._pending) > 64:
            self._pending = [(w, d, x) for w, d, x in self._pending if not w.is_completed()]

    def wait_sends(self) -> None:
        """Block until every send issued so far has completed."""
        self.waiter.wait([(w, d) for w, d, _ in self._pending], "sending this step's boundary tensors")
        self._pending.clear()
