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
posted when their action runs -- at message granularity: a receive first
posts those of every message the same peer sent before it
(:mod:`pipec.runtime.pair_order`, which says why that never adds waiting), so
a rank receives each pair's messages in send order even where one RECV action's
messages are interleaved with another's (skip tensors across interleaved stages).

**Shapes that follow the data.** A step may have another batch size or
sequence length than the plan's example (:mod:`pipec.microbatch`), so
its boundary tensors have other shapes, which a receiver must know to post its
receive. Every rank gets the full batch, so every rank knows the step's
per-micro-batch input shapes, and for a traced graph those decide every
boundary's shape. :meth:`P2P.begin_step` takes them as the step's key: the
plan's key runs on the preallocated buffers as above (the common case costs
nothing); a key seen in an earlier step reuses the boundary shapes that step
learnt (buffers allocated once per key change, receives posted ahead as
usual); a new key makes a *learning* step, where each forward message is
preceded by a small int64 header with its shape and receives are posted when
their action runs -- every rank agrees which steps learn, because they see the
same keys in the same order. Gradients need no header: a gradient has the
shape of the forward tensor the receiver sent. A sender checks every tensor
against the shape the receiver expects, so shapes that depend on the data
(not only on the input shapes) fail the step instead of corrupting it.

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
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from pipec.errors import ConfigError, RuntimeFailure
from pipec.plan import Boundary
from pipec.runtime import gloo_io
from pipec.runtime.pair_order import Incoming, incoming_order
from pipec.runtime.routing import StageRoutes, boundary_index
from pipec.runtime.waiting import Request, Waiter
from pipec.schedule.ir import Action, ActionKind
from pipec.schedule.stage_graph import message_order

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

FORWARD, BACKWARD, HEADER = 0, 1, 2  # HEADER: a forward message's shape, in learning steps

PLANNED, KNOWN, LEARNING = "planned", "known", "learning"  # how a step knows its boundary shapes
MAX_KNOWN_SHAPES = 1024  # input-shape keys remembered; past it all are forgotten (on every rank alike)

_Key = tuple[int, str, int, int]  # (local stage, boundary, peer stage, micro-batch)


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


def _join_failure(exc: BaseException, timeout: float | None) -> RuntimeFailure:
    """Why this rank could not join the process group (torchrun's variables set)."""
    rank = _env_int("RANK", 0)
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    host = ("the launcher (torchrun)" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            else "rank 0")
    text = " ".join(str(exc).split("\n")[0].split())[:300]
    within = f" within {timeout:g} s" if timeout is not None else ""
    if rank == 0 and host == "rank 0":
        cause = "another rank failed or exited before joining"
    else:
        cause = f"{host}, which hosts the rendezvous store, failed or exited, or another rank never joined"
    return RuntimeFailure(
        f"rank {rank} could not join the process group of {os.environ['WORLD_SIZE']} ranks at {address}"
        f"{within} ({type(exc).__name__}: {text}): {cause}; or the ranks disagree on the address. "
        "See the other ranks' output",
        rank=rank,
    )


def _attempt_store(timeout: float | None) -> Store | None:
    """After torchrun restarted the ranks (``--max-restarts``): the agent's store, under a
    prefix of this attempt. torchrun's static rendezvous keeps ONE store for every
    attempt and torch does not prefix its keys, so the restarted ranks would read the
    addresses the dead attempt's ranks published and Gloo would connect to them
    ("Connection refused"). None on the first attempt, or when the agent hosts no store."""
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = TCPStore(
        os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), _env_int("WORLD_SIZE", 1), is_master=False,
        timeout=datetime.timedelta(seconds=timeout if timeout is not None else 1800),
    )
    return PrefixStore(f"pipec/attempt_{attempt}/", store)


def init_process_group(
    num_ranks: int,
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: float | None = None,
    data_parallel: int = 1,
) -> ProcessGroupInfo:
    """Join the default process group, initialising it from torchrun's variables if needed
    (with ``timeout`` seconds for its collectives and store operations).

    ``num_ranks`` is the plan's world (``data_parallel`` replicas of its pipeline).
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
        try:
            store = _attempt_store(timeout)
            if store is not None:
                dist.init_process_group(
                    chosen, store=store, rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                    timeout=datetime.timedelta(seconds=timeout if timeout is not None else 1800),
                )
            elif timeout is None:
                dist.init_process_group(chosen)
            else:
                dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout))
        except dist.DistError as exc:  # a rank that never came, or a store host that left
            raise _join_failure(exc, timeout) from exc
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
    if world_size != num_ranks and data_parallel > 1:
        pipeline = num_ranks // data_parallel
        raise ConfigError(
            f"the plan runs on {data_parallel} replicas x {pipeline} pipeline ranks = {num_ranks} processes, "
            f"but the process group has {world_size}; launch {num_ranks} processes (`pipec run DIR`, or "
            f"torchrun with --nnodes x --nproc-per-node = {num_ranks}), or re-plan with "
            f"data_parallel x ranks = {world_size}"
        )
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


class ReceiveCounts(NamedTuple):
    """How a rank's receive actions were posted (:meth:`P2P.receive_counts`): ``ahead``
    early in their step (Gloo), ``on_demand`` when their action ran (NCCL, and steps
    that learn new shapes; on Gloo otherwise each costs a round trip on the critical
    path), ``unused`` posted ahead but not taken by an action yet (0 after each step)."""

    ahead: int
    on_demand: int
    unused: int


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
    ``actions`` are every rank's lowered actions (the schedule all ranks run):
    without tags (NCCL) they give each peer's send order, which receives follow
    (module doc); without them, receives follow each action's own message order.
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
        actions: Sequence[Sequence[Action]] | None = None,
        pipeline_rank: int | None = None,
        to_global: Callable[[int], int] | None = None,
    ) -> None:
        self.info = info
        self.rank_of = rank_of
        self.num_microbatches = num_microbatches
        self.waiter = waiter
        self._use_tags = info.backend != "nccl"
        self._pending: list[tuple[dist.Work, int, torch.Tensor]] = []
        index = boundary_index(boundaries)
        me = info.rank
        # with D replicas (pipec.runtime.mesh) ``rank_of`` gives global ranks of this replica,
        # ``actions`` are indexed by pipeline rank (``pipeline_rank``; ``to_global`` maps one)
        row = me if pipeline_rank is None else pipeline_rank
        glob: Callable[[int], int] = to_global if to_global is not None else (lambda r: r)

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
                key=lambda m: message_order(m.peer_stage, index[m.name]),
            )
            self._recv_b[s] = sorted(
                (
                    msg(o.name, c, o.boundary, c)
                    for o in r.outputs
                    if o.carries_grad
                    for c in o.consumers
                    if rank_of(c) != me
                ),
                key=lambda m: message_order(m.peer_stage, index[m.name]),
            )
            remote_in = [i for i in r.boundary_inputs() if i.producer is not None and rank_of(i.producer) != me]
            self._recv_f[s] = sorted(
                (msg(i.name, i.producer, i.boundary, s) for i in remote_in if i.boundary and i.producer is not None),
                key=lambda m: message_order(m.peer_stage, index[m.name]),
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
        self._zeros: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        # receives posted ahead of their action: (direction, stage, micro-batch) -> requests
        self._posted: dict[tuple[int, int, int], list[Request]] = {}
        self._ahead = self._on_demand = 0  # receive actions posted each way (receive_counts)
        # without tags: each peer's send order (train, forward-only) and how far it is received
        self._by_key = {(d, s, m.name, m.peer_stage): m for d, lists in ((FORWARD, self._recv_f), (BACKWARD, self._recv_b))
                        for s, msgs in lists.items() for m in msgs}
        self._orders: dict[bool, dict[int, list[Incoming]]] = {}
        if actions is not None and not self._use_tags:
            rf = {s: [(m.name, m.peer_stage) for m in msgs] for s, msgs in self._recv_f.items()}
            rb = {s: [(m.name, m.peer_stage) for m in msgs] for s, msgs in self._recv_b.items()}
            self._orders = {
                True: incoming_order(actions, row, recv_forward=rf, recv_backward=rb, boundary_index=index),
                False: incoming_order(actions, row, recv_forward=rf, recv_backward=rb, boundary_index=index,
                                      keep=_forward_only),
            }
            # the schedule's rows are pipeline ranks; messages name their peers' global ranks
            self._orders = {k: {glob(src): seq for src, seq in v.items()} for k, v in self._orders.items()}
        self._order: dict[int, list[Incoming]] = {}
        self._next: dict[int, int] = {}  # source rank -> messages of its order posted so far
        self._drained: dict[Incoming, Request] = {}  # posted, not yet taken by their action
        # boundary shapes of steps shaped unlike the plan (see the module doc)
        self._mode = PLANNED
        self._key: object = None
        self._known: dict[object, tuple[dict[_Key, tuple[int, ...]], dict[_Key, tuple[int, ...]]]] = {}
        self._in_shapes: dict[_Key, tuple[int, ...]] = {}  # forward inputs received (consumer's view)
        self._out_shapes: dict[_Key, tuple[int, ...]] = {}  # forward outputs sent (producer's view)
        self._bufs: dict[tuple[int, _Key], torch.Tensor] = {}  # (direction, key) -> receive buffer
        self._bufs_key: object = None

    # -- the step's shapes ---------------------------------------------------
    def begin_step(self, key: object, *, planned: bool) -> None:
        """Start a step whose per-micro-batch input shapes are ``key`` (``planned``: the
        plan's own); see the module doc. Every rank must pass the same keys in the same order."""
        self._key = key
        if planned:
            self._mode = PLANNED
            return
        known = self._known.get(key)
        if known is None:
            self._mode, self._in_shapes, self._out_shapes = LEARNING, {}, {}
        else:
            self._mode, (self._in_shapes, self._out_shapes) = KNOWN, known
        if self._bufs_key != key:
            self._bufs, self._bufs_key = {}, key

    def end_step(self) -> None:
        """The step completed: remember the shapes a learning step saw under its key."""
        if self._mode == LEARNING:
            if len(self._known) >= MAX_KNOWN_SHAPES:
                self._known.clear()
            self._known[self._key] = (self._in_shapes, self._out_shapes)
            self._mode = KNOWN

    @property
    def learning(self) -> bool:
        return self._mode == LEARNING

    def _expected(self, direction: int, stage: int, m: _Message, microbatch: int) -> tuple[int, ...]:
        """The shape of ``m`` for ``microbatch``: forward input (FORWARD) or output (BACKWARD)
        of local ``stage``; in a learning step, known once the forward tensor passed."""
        if self._mode == PLANNED:
            return m.shape
        shapes = self._in_shapes if direction == FORWARD else self._out_shapes
        return shapes[(stage, m.name, m.peer_stage, microbatch)]

    def _buffer(self, direction: int, stage: int, m: _Message, microbatch: int) -> torch.Tensor:
        if self._mode == PLANNED:
            bufs = self._fbuf if direction == FORWARD else self._bbuf
            return bufs[(stage, m.name, m.peer_stage, microbatch)]
        key = (direction, (stage, m.name, m.peer_stage, microbatch))
        buf = self._bufs.get(key)
        if buf is None:
            shape = self._expected(direction, stage, m, microbatch)
            buf = self._bufs[key] = torch.empty(shape, dtype=m.dtype, device=self.info.device)
        return buf

    def _empty(self, m: _Message) -> torch.Tensor:
        return torch.empty(m.shape, dtype=m.dtype, device=self.info.device)

    def _tag(self, m: _Message, microbatch: int, direction: int) -> int:
        if not self._use_tags:
            return 0
        return (m.tag_base * self.num_microbatches + microbatch) * 3 + direction

    def has_forward_sends(self, stage: int) -> bool:
        return bool(self._send_f.get(stage))

    # -- receives posted ahead -------------------------------------------
    def post_receives(self, receives: Sequence[tuple[int, int, int]]) -> None:
        """Post the step's receives ``(direction, stage, micro-batch)`` now, so their
        data moves as soon as the peer sends it; no-op on NCCL (see the module doc)."""
        if not self._use_tags or self._mode == LEARNING:
            return
        self._posted.clear()
        for direction, stage, microbatch in receives:
            self._posted[(direction, stage, microbatch)] = self._post(direction, stage, microbatch)
        self._ahead += len(receives)

    def receive_counts(self) -> ReceiveCounts:
        """The receive actions posted ahead and on demand since this P2P was made, and
        those posted ahead that no action has taken yet."""
        return ReceiveCounts(self._ahead, self._on_demand, len(self._posted))

    def discard_posted(self) -> None:
        """Forget receives posted for a step that ended early (its process group is
        being torn down); their buffers are not read again."""
        self._posted.clear()
        self._drained.clear()
        self._next.clear()

    def begin_actions(self, train: bool) -> None:
        """A step's actions start: a training step's, or (``train`` False) the forward-only
        ones; without tags, receives follow that step's send order per peer."""
        self._order = self._orders.get(train, {})
        self._next, self._drained = {}, {}

    def _drain_to(self, m: _Message, key: Incoming) -> Request:
        """Post the receives of every message ``m``'s peer sends before ``key``, then
        ``key``'s own (module doc); returns ``key``'s request."""
        src = m.peer_rank
        seq = self._order.get(src, ())
        while key not in self._drained:
            i = self._next.get(src, 0)
            if i >= len(seq):
                raise RuntimeError(
                    f"rank {src} sends no message {key[2]!r} for stage {key[1]}, micro-batch {key[4]} in its "
                    "actions; the plan's schedule and its stage modules are out of sync, re-create the plan"
                )
            self._next[src] = i + 1
            direction, stage, name, peer, microbatch = k = seq[i]
            msg = self._by_key[(direction, stage, name, peer)]
            if direction == FORWARD and self._mode == LEARNING:  # its shape header comes first
                header = torch.empty(len(msg.shape), dtype=torch.int64, device=self.info.device)
                self.waiter.wait([self._irecv(header, msg, microbatch, HEADER)],
                                 f"receiving the shape of {name!r} for stage {stage}, micro-batch {microbatch}")
                self._in_shapes[(stage, name, peer, microbatch)] = tuple(int(d) for d in header.tolist())
            self._drained[k] = self._irecv(self._buffer(direction, stage, msg, microbatch), msg, microbatch, direction)
        return self._drained.pop(key)

    def _messages(self, direction: int, stage: int, microbatch: int) -> list[tuple[_Message, torch.Tensor]]:
        """``stage``'s incoming messages in one direction, each with its receive buffer."""
        msgs = self._recv_f if direction == FORWARD else self._recv_b
        return [(m, self._buffer(direction, stage, m, microbatch)) for m in msgs[stage]]

    def _post(self, direction: int, stage: int, microbatch: int) -> list[Request]:
        return [self._irecv(buf, m, microbatch, direction) for m, buf in self._messages(direction, stage, microbatch)]

    def _irecv(self, buf: torch.Tensor, m: _Message, microbatch: int, direction: int) -> Request:
        try:
            return _irecv(buf, m.peer_rank, self._tag(m, microbatch, direction)), m.peer_rank
        except RuntimeError as error:  # the pair is closed: the peer failed or died
            raise self.waiter.failure(m.peer_rank, f"posting a receive of {m.name!r}", error) from error

    def _receive(self, direction: int, stage: int, microbatch: int) -> list[Request]:
        if self._order:
            msgs = self._recv_f if direction == FORWARD else self._recv_b
            return [self._drain_to(m, (direction, stage, m.name, m.peer_stage, microbatch)) for m in msgs[stage]]
        posted = self._posted.pop((direction, stage, microbatch), None)
        if posted is not None:
            return posted
        self._on_demand += 1
        return self._post(direction, stage, microbatch)

    # -- forward ---------------------------------------------------------
    def send_forward(self, stage: int, microbatch: int, outputs: Mapping[str, torch.Tensor]) -> None:
        for m in self._send_f[stage]:
            if self._mode == LEARNING:
                self._send_header(outputs[m.name], stage, m, microbatch)
            self._isend(outputs[m.name], m, microbatch, FORWARD, self._expected(BACKWARD, stage, m, microbatch))

    def _send_header(self, tensor: torch.Tensor, stage: int, m: _Message, microbatch: int) -> None:
        if tensor.dim() != len(m.shape):
            raise RuntimeError(
                f"tensor {m.name!r} for micro-batch {microbatch} has {tensor.dim()} dimensions "
                f"{tuple(tensor.shape)}, the plan's has {len(m.shape)} {m.shape}; the stage's code does not "
                "follow this batch's shape, re-plan with inputs shaped like the real batch"
            )
        shape = tuple(int(d) for d in tensor.shape)
        self._out_shapes[(stage, m.name, m.peer_stage, microbatch)] = shape
        header = torch.tensor(shape, dtype=torch.int64, device=self.info.device)
        self._isend(header, m, microbatch, HEADER, shape=(len(shape),), dtype=torch.int64)

    def _recv_learning(self, stage: int, microbatch: int) -> list[Request]:
        """A learning step's forward receives: each message's shape header, then its data."""
        works: list[Request] = []
        self._on_demand += 1
        for m in self._recv_f[stage]:
            header = torch.empty(len(m.shape), dtype=torch.int64, device=self.info.device)
            self.waiter.wait([self._irecv(header, m, microbatch, HEADER)],
                             f"receiving the shape of {m.name!r} for stage {stage}, micro-batch {microbatch}")
            self._in_shapes[(stage, m.name, m.peer_stage, microbatch)] = tuple(int(d) for d in header.tolist())
            works.append(self._irecv(self._buffer(FORWARD, stage, m, microbatch), m, microbatch, FORWARD))
        return works

    def recv_forward(self, stage: int, microbatch: int) -> dict[str, torch.Tensor]:
        """Receive every remote input of ``stage`` for ``microbatch``; returns the buffers."""
        if self._mode == LEARNING and not self._order:
            works = self._recv_learning(stage, microbatch)
        else:
            works = self._receive(FORWARD, stage, microbatch)
        out = {m.name: buf for m, buf in self._messages(FORWARD, stage, microbatch)}
        self.waiter.wait(works, f"receiving the inputs of stage {stage} for micro-batch {microbatch}")
        self._prune_sends()
        return out

    # -- backward --------------------------------------------------------
    def send_backward(self, stage: int, microbatch: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Send the gradients of ``stage``'s remote inputs; a missing gradient is sent as zeros."""
        for m in self._send_b[stage]:
            shape = self._expected(FORWARD, stage, m, microbatch)  # the forward input's
            g = grads.get(m.name)
            if g is None:
                g = self._zeros.get((m.name, shape))
                if g is None:
                    g = self._zeros[(m.name, shape)] = torch.zeros(shape, dtype=m.dtype, device=self.info.device)
            # the consumer of the message is ``stage``; tag it like the forward message
            self._isend(g, m, microbatch, BACKWARD, shape)

    def recv_backward(self, stage: int, microbatch: int) -> dict[tuple[str, int], torch.Tensor]:
        """Receive the gradients of ``stage``'s outputs from remote consumers,
        keyed by (boundary name, consumer stage)."""
        works = self._receive(BACKWARD, stage, microbatch)
        out = {(m.name, m.peer_stage): buf for m, buf in self._messages(BACKWARD, stage, microbatch)}
        self.waiter.wait(works, f"receiving the output gradients of stage {stage} for micro-batch {microbatch}")
        self._prune_sends()
        return out

    # -- bookkeeping -----------------------------------------------------
    def _isend(self, tensor: torch.Tensor, m: _Message, microbatch: int, direction: int,
               shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
        t = tensor.detach()
        dtype = m.dtype if dtype is None else dtype
        if t.shape != shape or t.dtype != dtype:
            what = "tensor" if direction == FORWARD else "gradient of"
            whose = "the plan expects" if self._mode == PLANNED else "this batch's input shapes gave"
            raise RuntimeError(
                f"{what} {m.name!r} for micro-batch {microbatch}: {whose} shape {shape} "
                f"{str(dtype).removeprefix('torch.')}, found {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}; "
                "shapes must depend on the input shapes only, not on the data"
            )
        t = t.contiguous()
        dst = m.peer_rank
        work = dist.isend(t, dst=dst, tag=self._tag(m, microbatch, direction))
        if work is None:
            raise RuntimeError(f"isend to rank {dst} returned no request; is this rank in the process group?")
        self._pending.append((work, dst, t))
        if self._use_tags and gloo_io.YIELD_AFTER_SEND:
            gloo_io.yield_core()  # Gloo's loop thread flushes what the send left queued (pipec.runtime.gloo_io)
        self._prune_sends()

    def _prune_sends(self) -> None:
        """Drop the sends that completed: their tensors (a forward output whose micro-batch
        finished, a gradient sent back) are freed now rather than at the end of the step,
        which the plan's memory model counts on (:mod:`pipec.partitioner.chain`). On Gloo
        ``is_completed()`` stays False until the send is waited for, so only a long list
        is checked there (:func:`pipec.partitioner.assemble.gloo_extra_bytes`)."""
        if self._use_tags and len(self._pending) <= 64:
            return  # Gloo: a send completes only once waited for (the plan counts them held)
        if self._pending and any(w.is_completed() for w, _, _ in self._pending):
            self._pending = [(w, d, x) for w, d, x in self._pending if not w.is_completed()]

    def buffers(self) -> list[torch.Tensor]:
        """The receive buffers preallocated from the plan (one per stage, message, micro-batch
        and direction), held across steps: memory the rank holds like its parameters."""
        return [*self._fbuf.values(), *self._bbuf.values()]

    def wait_sends(self) -> None:
        """Block until every send issued so far has completed."""
        self.waiter.wait([(w, d) for w, d, _ in self._pending], "sending this step's boundary tensors")
        self._pending.clear()


def _forward_only(a: Action) -> bool:
    """The actions of a forward-only (inference) step (as the executor runs them)."""
    return a.kind in (ActionKind.F, ActionKind.SEND_F, ActionKind.RECV_F)
