"""The ring all-reduce, from point-to-point costs: the one model of a collective.

Phase: cost model. Used by :meth:`pipec.costs.hardware.HardwareSpec.allreduce_time`
(its links at the file's all-reduce efficiency) and by the partitioner for
cost models that have only ``comm_time``. Plain Python: no torch.

A ring all-reduce of ``num_bytes`` among ``n`` ranks is ``2 (n - 1)`` steps
(a reduce-scatter, then an all-gather), each moving ``num_bytes / n`` over
every link of the ring at once, so each step is as slow as the slowest link
(Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", JPDC 69(2), 2009).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def ring_allreduce_time(
    comm_time: Callable[[int, int, int], float], num_bytes: int, ranks: Sequence[int]
) -> float:
    """Seconds for a ring all-reduce of ``num_bytes`` among ``ranks``, where
    ``comm_time(num_bytes, src, dst)`` prices one step on one link; 0 for fewer
    than two ranks."""
    ring = sorted(set(ranks))
    n = len(ring)
    if n < 2:
        return 0.0
    chunk = -(-num_bytes // n)
    step = max(float(comm_time(chunk, a, b)) for a, b in zip(ring, ring[1:] + ring[:1]))
    return 2 * (n - 1) * step


__all__ = ["ring_allreduce_time"]
