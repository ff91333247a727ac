"""Phase partition: checking the user's arguments at the API boundary.

Input: the raw arguments of :func:`pipec.partition` / ``plan_from_split``.
Output: normalised values (per-rank tuples, ints), or a
:class:`~pipec.errors.ConfigError` that says what was expected, what was
found, and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipec.errors import ConfigError
from pipec.partitioner.problem import AllReduceTime
from pipec.types import CostModel
from pipec.units import parse_bytes

MemoryLimit = int | float | str | Sequence[int | float | str | None] | None


def count(name: str, value: object, *, low: int = 1, high: int | None = None, advice: str = "") -> int:
    """``value`` as an int in ``low .. high``."""
    span = f"{low}..{high}" if high is not None else f">= {low}"
    fix = f"; pass a whole number {'in ' if high is not None else ''}{span}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an int, found {value!r} ({type(value).__name__}){advice}{fix}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name}: expected {span}, found {value}{advice}{fix}")
    return value


def memory_limits(memory_limit: MemoryLimit, num_ranks: int, cost_model: CostModel | None) -> tuple[int | None, ...]:
    """One limit per rank: a size for all, one per rank, or the cost model's capacity."""
    if memory_limit is None:
        capacity = cost_model.memory_capacity if cost_model is not None else None
        return (capacity,) * num_ranks
    if isinstance(memory_limit, (int, float, str)):
        return (parse_bytes(memory_limit, what="memory_limit"),) * num_ranks
    if isinstance(memory_limit, Sequence):
        if len(memory_limit) != num_ranks:
            raise ConfigError(
                f"memory_limit: expected one size or one per rank ({num_ranks}), found {len(memory_limit)} "
                "values; pass e.g. '80GiB' for every rank"
            )
        return tuple(None if m is None else parse_bytes(m, what=f"memory_limit[{r}]")
                     for r, m in enumerate(memory_limit))
    raise ConfigError(
        f"memory_limit: expected a size such as '80GiB', found {type(memory_limit).__name__}; "
        "pass one size for every rank or a list with one per rank"
    )


def device_speeds(speeds: Sequence[float] | None, num_ranks: int) -> tuple[float, ...]:
    """Relative speed per rank (1.0 each by default)."""
    if speeds is None:
        return (1.0,) * num_ranks
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence):
        raise ConfigError(
            f"device_speeds: expected one number per rank, found {speeds!r}; "
            f"pass a list such as {[1.0] * num_ranks}"
        )
    if len(speeds) != num_ranks:
        raise ConfigError(
            f"device_speeds: expected {num_ranks} values (one per rank: num_stages / stages_per_rank), "
            f"found {len(speeds)}; pass one relative speed per rank, e.g. {[1.0] * num_ranks}"
        )
    out = []
    for r, s in enumerate(speeds):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ConfigError(
                f"device_speeds[{r}]: expected a finite number > 0, found {s!r}; pass each rank's "
                "speed relative to the others, e.g. 1.0 for a full device and 0.5 for one half as fast"
            )
        out.append(float(s))
    return tuple(out)


def allreduce_time(cost_model: CostModel | None) -> AllReduceTime | None:
    """The cost model's ``allreduce_time(num_bytes, ranks)`` when it has one (the
    shipped ones do; it is not part of the :class:`~pipec.types.CostModel`
    protocol), else None: the partitioner then builds a ring from ``comm_time``."""
    method = getattr(cost_model, "allreduce_time", None)
    return method if callable(method) else None


def num_ranks(num_stages: int, stages_per_rank: int) -> int:
    """Ranks for ``num_stages`` with ``stages_per_rank`` each."""
    count("stages_per_rank", stages_per_rank)
    if num_stages % stages_per_rank:
        small = [d for d in range(1, math.isqrt(num_stages) + 1) if num_stages % d == 0]
        divisors = sorted({*small, *(num_stages // d for d in small)})
        raise ConfigError(
            f"stages_per_rank: expected a divisor of num_stages={num_stages}, found {stages_per_rank}; "
            f"every rank holds the same number of stages, so use one of {divisors} "
            "or make num_stages a multiple of stages_per_rank"
        )
    return num_stages // stages_per_rank


__all__ = ["MemoryLimit", "count", "device_speeds", "memory_limits", "num_ranks"]
