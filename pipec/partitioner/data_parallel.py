"""Phase partition: ``data_parallel=D`` -- D replicas of one pipeline.

Input: the ``data_parallel`` argument of :func:`pipec.partition` and the GLOBAL
example batch (every replica's samples). Output: the checked replica count,
replica 0's share of the example (what the single-pipeline partitioner traces,
costs and splits: every replica runs the same stages on ``batch / D``
samples), and the plan data stamped with ``D`` and the global batch size.

Replica ``d`` gets rows ``[d b, (d + 1) b)`` of the global batch
(:func:`pipec.microbatch.replica_share`), split into the plan's micro-batches,
so global micro-batch ``d * M + m`` is replica ``d``'s micro-batch ``m``.
Pricing the gradient all-reduce across replicas and choosing D
(``data_parallel="auto"``) belong to the planner's search, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipec.errors import ConfigError
from pipec.microbatch import replica_share
from pipec.partitioner.single import Partitioned


def check_data_parallel(value: object) -> int:
    """``value`` as a replica count >= 1 (a :class:`ConfigError` otherwise)."""
    if isinstance(value, str):
        raise ConfigError(
            f"data_parallel: expected a whole number of replicas >= 1, found {value!r}; "
            "searching it ('auto') is not available in this version: pass e.g. data_parallel=2"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data_parallel: expected a whole number of replicas >= 1, found {value!r}; "
                          "pass e.g. data_parallel=2 (1: one pipeline)")
    return value


def check_global_batch(batch: int | None, data_parallel: int, num_microbatches: object) -> None:
    """ConfigError when the global batch does not split into ``D x M`` equal micro-batches."""
    if batch is None or data_parallel == 1:
        return
    parts = data_parallel * num_microbatches if isinstance(num_microbatches, int) else data_parallel
    if batch % parts:
        what = (f"data_parallel x num_microbatches = {data_parallel} x {num_microbatches} = {parts}"
                if parts != data_parallel else f"data_parallel = {data_parallel}")
        fits = [m for m in range(1, batch // data_parallel + 1) if batch % (data_parallel * m) == 0]
        advice = (f"num_microbatches one of {fits}" if fits and isinstance(num_microbatches, int)
                  else f"a global batch of a multiple of {parts} samples")
        raise ConfigError(
            f"the global batch has {batch} samples along dim 0, which {what} does not divide: every "
            f"replica gets batch / data_parallel samples in equal micro-batches; use {advice}"
        )


def replica_example(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], target: Any, data_parallel: int
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """Replica 0's share of the example inputs and target: what one pipeline sees."""
    mb_args, mb_kwargs = replica_share((args, dict(kwargs)), data_parallel, 0)
    share_target = replica_share(target, data_parallel, 0) if target is not None else None
    return tuple(mb_args), dict(mb_kwargs), share_target


def with_data_parallel(found: Partitioned, data_parallel: int, batch: int | None) -> Partitioned:
    """The single pipeline's plan as one of ``data_parallel`` replicas of the global ``batch``."""
    if data_parallel == 1:
        return found
    update: dict[str, Any] = {"data_parallel": data_parallel}
    if batch is not None:
        update["batch_size"] = batch
    return Partitioned(found.data.model_copy(update=update), found.traced)


__all__ = ["check_data_parallel", "check_global_batch", "replica_example", "with_data_parallel"]
