"""Phase partition: the chain problem as plain data (no torch, no fx).

Input of the pure partitioning algorithm (:mod:`pipec.partitioner.algorithm`),
built from a traced graph by :mod:`pipec.partitioner.graph` or by hand in
tests. Positions ``0 .. N-1`` are the compute nodes in topological order; a
*cut* ``c`` (``0 <= c <= N``) lies between positions ``c - 1`` and ``c``, and
a split into ``S`` stages is the cut list ``0 = c_0 < c_1 < ... < c_S = N``
(stage ``k`` holds positions ``[c_k, c_{k+1})`` and runs on rank
``placement[k]``, the schedule's placement; default ``k % R``).

Units: seconds (float) and bytes (int).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from pipec.costs.ring import ring_allreduce_time
from pipec.errors import PartitionError
from pipec.schedule.ir import round_robin_placement

CommTime = Callable[[int, int, int], float]
"""``comm_time(num_bytes, src_rank, dst_rank) -> seconds``, as on :class:`pipec.CostModel`."""

AllReduceTime = Callable[[int, Sequence[int]], float]
"""``allreduce_time(num_bytes, ranks) -> seconds``, as on the shipped cost models."""


def exchange_time(
    comm_time: CommTime | None, allreduce_time: AllReduceTime | None, num_bytes: int, ranks: Sequence[int]
) -> float:
    """Seconds to all-reduce ``num_bytes`` among ``ranks``: ``allreduce_time`` when
    given, else a ring over ``comm_time`` (:func:`pipec.costs.ring.ring_allreduce_time`);
    0 for one rank or without a comm model."""
    if len(set(ranks)) < 2 or comm_time is None:
        return 0.0
    if allreduce_time is not None:
        return float(allreduce_time(num_bytes, tuple(sorted(set(ranks)))))
    return ring_allreduce_time(comm_time, num_bytes, ranks)


@dataclass(frozen=True)
class ChainTensor:
    """A value produced by the node at ``producer`` and read by later nodes.

    ``consumers`` are the reading positions, sorted, all ``> producer`` (the
    graph's output node counts as position ``N - 1``: it lives on the last
    stage). Graph inputs and parameters are not chain tensors: every stage has
    them for free. ``is_floating`` tensors also carry a gradient back.
    """

    producer: int
    consumers: tuple[int, ...]
    num_bytes: int
    is_floating: bool = True


@dataclass(frozen=True)
class ParamGroup:
    """One parameter (or buffer) and the positions that read it.

    A group with users on several stages is *tied*: it lives (and counts in
    memory) on each of them, and its gradient is exchanged between them.
    """

    num_bytes: int
    numel: int
    users: tuple[int, ...]
    is_buffer: bool = False


@dataclass(frozen=True, eq=False)
class ChainProblem:
    """Everything the partitioner needs, per micro-batch.

    - ``compute_time[i]``: forward + backward seconds of node ``i`` on a device
      of speed 1 (divided by the stage's rank speed).
    - ``cuttable``: ``N + 1`` flags, ``cuttable[c]`` allows cut ``c``; a cut is
      forbidden where a value that is not a plain tensor (an ``int`` from
      ``x.size(0)``, a tuple before its ``getitem``) is live across it. Entries
      0 and ``N`` are ignored. ``None``: every cut is allowed.
    - ``saved_bytes[i]``: activations node ``i`` keeps for backward.
    - ``comm_time``: seconds to move bytes between two ranks; ``None`` = free.
    - ``allreduce_time``: seconds to all-reduce bytes among ranks (a tied
      gradient, once per step); ``None`` = a ring over ``comm_time``
      (:func:`pipec.costs.ring.ring_allreduce_time`).
    - ``memory_limit``: one entry per rank (``None`` = unlimited), or ``None``.
    - ``in_flight``: micro-batches whose activations stage ``k`` holds at its
      peak; ``None`` = the closed form for ``schedule``
      (:func:`pipec.schedule.in_flight.in_flight_formula`).
    - ``optimizer_state_bytes_per_param``: 8 = Adam's two fp32 moments.
    - ``placement``: the rank of each stage, as the schedule places it
      (:attr:`pipec.schedule.ir.Schedule.placement`); ``None`` = round-robin.
    - ``recompute``: the activation-recompute policies each stage may take
      (:mod:`pipec.costs.recompute`), fastest first; the stage cost takes the
      fastest one that fits its rank's memory (:mod:`pipec.partitioner.chain`).
    - ``forward_time[i]``: node ``i``'s forward seconds, what recomputing it costs
      (``None`` = 0); ``matmul[i]``: whether it is matmul-like (``selective`` keeps
      its output, ``output_bytes[i]``, and does not recompute it).
    - ``in_backward``: per stage, the micro-batches whose backward has started but
      not finished at once at most (1; more when ``W`` runs later than ``I``): a
      recomputing stage holds their activations in full (``None`` = 1).
    - ``held_grads``: per stage, the micro-batches between their ``I`` and ``W`` at
      once (0 without the split): each keeps the gradient ``I`` captured at every
      matmul-like node for ``W``, ``output_bytes`` of it (``None`` = 0).
    """

    compute_time: tuple[float, ...]
    num_stages: int
    tensors: tuple[ChainTensor, ...] = ()
    cuttable: tuple[bool, ...] | None = None
    params: tuple[ParamGroup, ...] = ()
    saved_bytes: tuple[int, ...] | None = None
    comm_time: CommTime | None = None
    allreduce_time: AllReduceTime | None = None
    num_ranks: int | None = None
    device_speeds: tuple[float, ...] | None = None
    memory_limit: tuple[int | None, ...] | None = None
    schedule: str = "1f1b"
    num_microbatches: int = 1
    in_flight: tuple[int, ...] | None = None
    optimizer_state_bytes_per_param: int = 8
    placement: tuple[int, ...] | None = None
    recompute: tuple[str, ...] = ("none",)
    forward_time: tuple[float, ...] | None = None
    matmul: tuple[bool, ...] | None = None
    output_bytes: tuple[int, ...] | None = None
    in_backward: tuple[int, ...] | None = None
    held_grads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_nodes(self) -> int:
        return len(self.compute_time)

    @property
    def ranks(self) -> int:
        """Number of ranks ``R`` (``num_ranks``, default one per stage)."""
        return self.num_ranks if self.num_ranks is not None else self.num_stages

    @cached_property
    def _placement(self) -> tuple[int, ...]:
        if self.placement is not None:
            return self.placement
        return round_robin_placement(self.num_stages, self.ranks)

    def rank_of(self, stage: int) -> int:
        """The rank of ``stage``: the schedule's placement (round-robin without one)."""
        return self._placement[stage]

    def speed_of(self, stage: int) -> float:
        return 1.0 if self.device_speeds is None else float(self.device_speeds[self.rank_of(stage)])

    def limit_of(self, rank: int) -> int | None:
        return None if self.memory_limit is None else self.memory_limit[rank]

    def exchange_time(self, num_bytes: int, ranks: Sequence[int]) -> float:
        """Seconds to all-reduce ``num_bytes`` among ``ranks`` (0 without a comm model)."""
        return exchange_time(self.comm_time, self.allreduce_time, num_bytes, ranks)

    def cut_positions(self) -> list[int]:
        """Interior cuts ``1 .. N-1`` that are allowed, ascending."""
        n = self.num_nodes
        if self.cuttable is None:
            return list(range(1, n))
        return [c for c in range(1, n) if self.cuttable[c]]



@dataclass(frozen=True)
class ChainSolution:
    """A split and what it costs. ``cuts`` has ``num_stages + 1`` entries.

    ``exact`` is False only where the optimal search had to restrict itself
    (see :func:`pipec.partitioner.algorithm.optimal_cuts`).
    """

    cuts: tuple[int, ...]
    stage_times: tuple[float, ...]
    stage_memory: tuple[int, ...]
    rank_memory: tuple[int, ...]
    strategy: str
    exact: bool = True

    @property
    def bottleneck(self) -> float:
        return max(self.stage_times)

    @property
    def num_stages(self) -> int:
        return len(self.cuts) - 1


def _fail(what: str, expected: str, found: object) -> PartitionError:
    return PartitionError(f"ChainProblem.{what}: expected {expected}, found {found!r}")


def _validate(p: ChainProblem) -> None:
    n = len(p.compute_time)
    if n < 1:
        raise _fail("compute_time", "at least one node", p.compute_time)
    if any(not (math.isfinite(t) and t >= 0) for t in p.compute_time):
        raise _fail("compute_time", "finite times >= 0", [t for t in p.compute_time if not t >= 0][:3])
    if not 1 <= p.num_stages <= n:
        raise PartitionError(
            f"num_stages: expected 1..{n} (one node at least per stage), found {p.num_stages}; "
            "use fewer stages or a model with more nodes"
        )
    r = p.ranks
    if not 1 <= r <= p.num_stages:
        raise _fail("num_ranks", f"1..num_stages={p.num_stages}", p.num_ranks)
    if p.cuttable is not None and len(p.cuttable) != n + 1:
        raise _fail("cuttable", f"{n + 1} flags (one per cut 0..N)", len(p.cuttable))
    if p.saved_bytes is not None and (len(p.saved_bytes) != n or min(p.saved_bytes) < 0):
        raise _fail("saved_bytes", f"{n} sizes >= 0", len(p.saved_bytes))
    if p.device_speeds is not None and (
        len(p.device_speeds) != r or not all(math.isfinite(s) and s > 0 for s in p.device_speeds)
    ):
        raise _fail("device_speeds", f"{r} speeds > 0 (one per rank)", p.device_speeds)
    if p.memory_limit is not None and (
        len(p.memory_limit) != r or any(m is not None and m <= 0 for m in p.memory_limit)
    ):
        raise _fail("memory_limit", f"{r} limits > 0 or None (one per rank)", p.memory_limit)
    if p.placement is not None and (
        len(p.placement) != p.num_stages or any(not 0 <= x < r for x in p.placement)
    ):
        raise _fail("placement", f"{p.num_stages} ranks in 0..{r - 1} (one per stage)", p.placement)
    if p.in_flight is not None and (len(p.in_flight) != p.num_stages or min(p.in_flight) < 0):
        raise _fail("in_flight", f"{p.num_stages} counts >= 0", p.in_flight)
    if p.num_microbatches < 1 or p.optimizer_state_bytes_per_param < 0:
        raise _fail("num_microbatches", ">= 1 (and optimizer_state_bytes_per_param >= 0)",
                    (p.num_microbatches, p.optimizer_state_bytes_per_param))
    if not p.recompute or any(x not in ("none", "selective", "full") for x in p.recompute):
        raise _fail("recompute", "policies among 'none', 'selective', 'full'", p.recompute)
    for what, values in (("forward_time", p.forward_time), ("matmul", p.matmul), ("output_bytes", p.output_bytes)):
        if values is not None and len(values) != n:
            raise _fail(what, f"{n} values (one per node)", len(values))
    if p.held_grads is not None and (len(p.held_grads) != p.num_stages or min(p.held_grads) < 0):
        raise _fail("held_grads", f"{p.num_stages} counts >= 0", p.held_grads)
    if p.in_backward is not None and (len(p.in_backward) != p.num_stages or min(p.in_backward) < 1):
        raise _fail("in_backward", f"{p.num_stages} counts >= 1", p.in_backward)
    for t in p.tensors:
        if not (0 <= t.producer < n and t.consumers and t.num_bytes >= 0
                and all(t.producer < c < n for c in t.consumers)
                and list(t.consumers) == sorted(set(t.consumers))):
            raise _fail("tensors", "producer < sorted distinct consumers < N and num_bytes >= 0", t)
    for g in p.params:
        if not (g.users and g.num_bytes >= 0 and g.numel >= 0 and all(0 <= u < n for u in g.users)):
            raise _fail("params", "users within 0..N-1 and sizes >= 0", g)


__all__ = ["ChainProblem", "ChainSolution", "ChainTensor", "CommTime", "ParamGroup"]
