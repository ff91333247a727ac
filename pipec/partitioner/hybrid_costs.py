"""Phase partition, hybrid search: one traced graph priced at every micro-batch size.

Input: the model traced and costed at one or two micro-batch sizes. Output:
:class:`CostCurve` (node costs at any micro-batch size) and :class:`SplitRecord`
(one split of the chain and what it costs at any micro-batch size, mesh and
schedule), the arithmetic :mod:`pipec.partitioner.hybrid_search` runs per
configuration instead of tracing and splitting again.

**What scales with the micro-batch size ``b``** (the assumption, stated):

- node times (F, I, W) are affine in ``b``: interpolated (and extrapolated)
  through the two sizes traced, exact at both. One size traced: proportional
  to ``b``. A roofline kernel is ``max(flops, bytes) + launch`` with flops and
  activation bytes proportional to ``b`` and weight bytes and launches fixed,
  so the line through two exact points is exact wherever a kernel stays on the
  same side of the ridge; between the two sizes it is at most the true time
  (a convex function lies under its chord) -- and a chosen configuration is
  re-traced at its own ``b`` anyway (:mod:`pipec.partitioner.hybrid`);
- activations a node saves for backward and tensors that cross stages are
  proportional to ``b``;
- parameters, gradients and optimizer state do not depend on ``b``.

A split (the cut positions) depends on ``b`` only through the ratio of node
times, which the line above keeps nearly constant, so the fast search splits
each (stages, ranks, placement) once on compute time and reuses the split
across D, M and mesh order, re-splitting under the memory limit only where the
reused split does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipec.partitioner.chain import evaluate, stage_params
from pipec.partitioner.graph import GraphChain
from pipec.partitioner.problem import ChainProblem
from pipec.types import NodeCost

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CostCurve:
    """Node costs traced at micro-batch sizes ``sizes`` (one or two), and the same at any size."""

    sizes: tuple[int, ...]
    costs: tuple[Mapping[str, NodeCost], ...]

    @property
    def reference(self) -> int:
        """The size whose traced graph the chains are built from (the first)."""
        return self.sizes[0]

    def times(self, names: Sequence[str], size: int) -> tuple[F64, F64, F64]:
        """Per node of ``names``: F, I and W seconds at micro-batch size ``size``."""
        def row(costs: Mapping[str, NodeCost]) -> tuple[F64, F64, F64]:
            got = [costs.get(n) for n in names]
            return (np.array([c.forward_time if c else 0.0 for c in got]),
                    np.array([c.input_grad_time if c else 0.0 for c in got]),
                    np.array([c.weight_grad_time if c else 0.0 for c in got]))

        first = row(self.costs[0])
        if len(self.sizes) < 2 or self.sizes[0] == self.sizes[1]:
            scale = size / self.sizes[0]
            return first[0] * scale, first[1] * scale, first[2] * scale
        second = row(self.costs[1])
        t = (size - self.sizes[0]) / (self.sizes[1] - self.sizes[0])
        out = tuple(np.maximum(a + (b - a) * t, 0.0) for a, b in zip(first, second))
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class Crossing:
    """Bytes (at the reference size) that go from stage ``producer`` to stage ``consumer``."""

    producer: int
    consumer: int
    num_bytes: int
    is_floating: bool


@dataclass(frozen=True)
class SplitRecord:
    """One split of a chain and what does not change with D, M or the mesh.

    Memory per stage is ``static + activations * b / reference * in_flight``
    (:mod:`pipec.partitioner.chain`'s model, separated into the part that holds
    one micro-batch and the rest); ``grad_bytes`` are the stage's trainable
    parameter bytes (its gradient all-reduce across replicas)."""

    cuts: tuple[int, ...]
    placement: tuple[int, ...]
    names: tuple[str, ...]  # compute node per chain position
    static_memory: tuple[int, ...]
    activation_memory: tuple[int, ...]  # per micro-batch in flight, at the reference size
    crossings: tuple[Crossing, ...]
    grad_bytes: tuple[int, ...]
    reference: int
    tied: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (bytes, stages) of each parameter on several stages

    @property
    def num_stages(self) -> int:
        return len(self.cuts) - 1

    def stage_times(self, node_times: tuple[F64, F64, F64], speeds: Sequence[float]) -> tuple[F64, F64, F64]:
        """Per stage: F, I, W seconds, from ``node_times`` (:meth:`CostCurve.times` of
        :attr:`names` at the micro-batch size wanted)."""
        f, i, w = node_times
        starts, ends = np.array(self.cuts[:-1]), np.array(self.cuts[1:])
        rate = np.array([speeds[r] for r in self.placement])

        def per_stage(x: F64) -> F64:
            prefix = np.concatenate([[0.0], np.cumsum(x)])
            out: F64 = (prefix[ends] - prefix[starts]) / rate
            return out

        return per_stage(f), per_stage(i), per_stage(w)

    def memory(self, size: int, in_flight: Sequence[int], num_ranks: int) -> tuple[int, ...]:
        """Per rank, bytes at micro-batch size ``size`` with ``in_flight[k]`` micro-batches on stage k."""
        out = [0] * num_ranks
        scale = size / self.reference
        for k, rank in enumerate(self.placement):
            out[rank] += self.static_memory[k] + int(round(self.activation_memory[k] * scale * in_flight[k]))
        return tuple(out)


def split_record(chain: GraphChain, problem: ChainProblem, cuts: Sequence[int], reference: int) -> SplitRecord:
    """What :class:`SplitRecord` keeps of the split ``cuts`` of ``problem`` (costs at ``reference``)."""
    import dataclasses

    s = problem.num_stages
    held = [evaluate(dataclasses.replace(problem, in_flight=(k,) * s, memory_limit=None), cuts).stage_memory
            for k in (0, 1)]
    stage_of = np.searchsorted(np.array(cuts[1:]), np.arange(problem.num_nodes), side="right")
    crossings: dict[tuple[int, int, bool], int] = {}
    for t in problem.tensors:
        p = int(stage_of[t.producer])
        for c in sorted({int(stage_of[q]) for q in t.consumers} - {p}):
            key = (p, c, t.is_floating)
            crossings[key] = crossings.get(key, 0) + t.num_bytes
    return SplitRecord(
        cuts=tuple(int(c) for c in cuts),
        placement=tuple(problem.rank_of(k) for k in range(s)),
        names=chain.names,
        static_memory=tuple(int(m) for m in held[0]),
        activation_memory=tuple(int(b - a) for a, b in zip(held[0], held[1])),
        crossings=tuple(Crossing(p, c, n, f) for (p, c, f), n in sorted(crossings.items())),
        grad_bytes=tuple(stage_params(problem, cuts[k], cuts[k + 1])[1] for k in range(s)),
        reference=reference,
        tied=tuple((g.num_bytes, stages) for g in problem.params if not g.is_buffer
                   and len(stages := tuple(sorted({int(stage_of[u]) for u in g.users}))) > 1),
    )


__all__ = ["CostCurve", "Crossing", "SplitRecord", "split_record"]
