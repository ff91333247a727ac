"""Phase partition: the two search engines behind every strategy.

:func:`monotone_minmax` -- the exact min-max split for costs of the form
``Q_k[j] - Q_k[i]`` (a prefix sum per stage, e.g. compute time over a rank's
speed, or the memory that only grows with the segment). Greedy "furthest
reach" decides a cap in O(S log N) (torchgpipe's block partition balances the
same sums, Lee et al. 2020 §3.3); bisection on the cap finds the optimum.

:func:`capped_dp` -- the exact dynamic program over (stage, end cut) for the
real stage costs of :mod:`pipec.partitioner.chain`, which are *not* monotone
in the segment (extending a stage past a consumer removes a send)::

    best[k + 1][j] = min over i of max(best[k][i], cost_k(i, j))
                     subject to time_k(i, j) <= time_cap, memory_k(i, j) <= memory_caps[k]

(PipeDream's partitioning DP, Narayanan et al. 2019 §3.1; Alpa's stage DP,
Zheng et al. 2022 §5, with stage = contiguous range of the topological
order). The caps only prune: every ``(i, j)`` with ``compute(i, j) / speed >
time_cap`` or with a monotone memory part above the cap is skipped without
being evaluated, and the cut ``c_k`` is confined to a window found by greedy
forward/backward reach under those necessary conditions. Hence if some split
meets the caps, the DP returns the exact optimum over all splits that do; the
work is proportional to the number of pairs in the windows, small when the
cap is close to the optimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pipec.partitioner.chain import stage_memories, stage_times
from pipec.partitioner.problem import ChainProblem

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_SLACK = 1e-9  # relative: window bounds include pairs a rounding error away from the cap
_CHUNK = 1 << 20  # pairs evaluated per numpy call


def _room(problem: ChainProblem) -> tuple[I64, I64, I64]:
    """``prev[x]``/``next[x]``: the nearest allowed cut <= / >= x; ``cuts``: the allowed interior cuts."""
    tab = problem.tables
    n = problem.num_nodes
    allowed = np.flatnonzero(tab.cuttable).astype(np.int64)  # includes 0 and N
    x = np.arange(n + 1)
    prev = allowed[np.searchsorted(allowed, x, side="right") - 1]
    nxt = allowed[np.searchsorted(allowed, x, side="left")]
    return prev, nxt, allowed[1:-1]


def monotone_minmax(problem: ChainProblem, prefixes: Sequence[F64]) -> tuple[float, tuple[int, ...]]:
    """Exact min over splits of ``max_k prefixes[k][c_{k+1}] - prefixes[k][c_k]``.

    Returns ``(value, cuts)``; value to a relative 1e-12 (bisection).
    """
    s, n = problem.num_stages, problem.num_nodes
    prev, _, inner = _room(problem)
    latest = [int(inner[len(inner) - (s - k - 1)]) if k < s - 1 else n for k in range(s)]

    def greedy(cap: float) -> tuple[int, ...] | None:
        cuts = [0]
        for k in range(s):
            q = prefixes[k]
            x = int(np.searchsorted(q, q[cuts[-1]] + cap, side="right")) - 1
            x = int(prev[min(x, latest[k])])
            if x <= cuts[-1]:
                return None
            cuts.append(x)
        return tuple(cuts) if cuts[-1] == n else None

    lo, hi = 0.0, max(float(q[n] - q[0]) for q in prefixes)
    best = greedy(hi)
    if best is None:  # every stage could take everything; only a lack of cut positions stops it
        raise ValueError("monotone_minmax: fewer allowed cuts than stages")
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    value = max(float(prefixes[k][best[k + 1]] - prefixes[k][best[k]]) for k in range(s))
    return value, best


def windows(problem: ChainProblem, time_cap: float, memory_caps: Sequence[float]) -> tuple[I64, I64] | None:
    """``(lo, hi)``: every split meeting the caps has ``lo[k] <= c_k <= hi[k]``; None if empty."""
    tab = problem.tables
    s, n = problem.num_stages, problem.num_nodes
    prev, nxt, inner = _room(problem)
    pt = tab.prefix_time
    hi = np.zeros(s + 1, dtype=np.int64)
    lo = np.zeros(s + 1, dtype=np.int64)
    for k in range(s):
        budget = time_cap * tab.speed[k] * (1 + _SLACK)
        x = int(np.searchsorted(pt, pt[hi[k]] + budget, side="right")) - 1
        if np.isfinite(memory_caps[k]):
            pm = tab.prefix_memory(k)
            x = min(x, int(np.searchsorted(pm, pm[hi[k]] + memory_caps[k], side="right")) - 1)
        x = min(x, int(inner[len(inner) - (s - k - 1)]) if k < s - 1 else n)
        hi[k + 1] = prev[max(x, 0)]
    lo[s] = n
    for k in range(s - 1, -1, -1):
        budget = time_cap * tab.speed[k] * (1 + _SLACK)
        x = int(np.searchsorted(pt, pt[lo[k + 1]] - budget, side="left"))
        if np.isfinite(memory_caps[k]):
            pm = tab.prefix_memory(k)
            x = max(x, int(np.searchsorted(pm, pm[lo[k + 1]] - memory_caps[k], side="left")))
        x = max(x, int(inner[k - 1]) if k > 0 else 0)
        lo[k] = nxt[min(x, n)]
    if np.any(lo > hi) or hi[s] != n or lo[0] != 0:
        return None
    return lo, hi


def capped_dp(
    problem: ChainProblem,
    *,
    time_cap: float,
    memory_caps: Sequence[float],
    objective: str = "time",
) -> tuple[float, tuple[int, ...]] | None:
    """Exact min over splits meeting the caps of the largest stage ``objective``
    (``"time"`` or ``"memory"``); ``(value, cuts)``, or None when no split meets them."""
    win = windows(problem, time_cap, memory_caps)
    if win is None:
        return None
    lo, hi = win
    tab = problem.tables
    s = problem.num_stages
    pt = tab.prefix_time
    positions = np.zeros(1, dtype=np.int64)
    values = np.zeros(1, dtype=np.float64)
    history: list[I64] = [positions]
    back: list[I64] = []
    allowed = np.flatnonzero(tab.cuttable).astype(np.int64)
    for k in range(s):
        # the reachable cuts so far bound this stage's end more tightly than the compute-only window
        budget = time_cap * tab.speed[k] * (1 + _SLACK)
        reach = int(np.searchsorted(pt, pt[positions[-1]] + budget, side="right")) - 1
        ends = allowed[(allowed >= lo[k + 1]) & (allowed <= min(int(hi[k + 1]), reach))]
        first = np.searchsorted(pt, pt[ends] - budget, side="left")
        if np.isfinite(memory_caps[k]):
            pm = tab.prefix_memory(k)
            first = np.maximum(first, np.searchsorted(pm, pm[ends] - memory_caps[k], side="left"))
        a = np.searchsorted(positions, first, side="left")
        b = np.searchsorted(positions, ends, side="left")
        keep = b > a
        ends, a, counts = ends[keep], a[keep], (b - a)[keep]
        new_values = np.full(len(ends), np.inf)
        new_back = np.zeros(len(ends), dtype=np.int64)
        for block in _blocks(counts):
            _relax(problem, k, positions, values, ends, a, counts, block, time_cap,
                   memory_caps[k], objective, new_values, new_back)
        ok = np.isfinite(new_values)
        if not ok.any():
            return None
        positions, values = ends[ok], new_values[ok]
        history.append(positions)
        back.append(new_back[ok])
    cuts = [problem.num_nodes]
    index = 0
    for k in range(s - 1, -1, -1):
        index = int(back[k][index])
        cuts.append(int(history[k][index]))
    return float(values[0]), tuple(reversed(cuts))


def _blocks(counts: I64) -> list[slice]:
    """Consecutive ranges of ``counts`` summing to about ``_CHUNK`` pairs each."""
    out, start, total = [], 0, 0
    for idx, c in enumerate(counts.tolist()):
        if total and total + c > _CHUNK:
            out.append(slice(start, idx))
            start, total = idx, 0
        total += c
    if start < len(counts):
        out.append(slice(start, len(counts)))
    return out


def _relax(problem: ChainProblem, k: int, positions: I64, values: F64, ends: I64, a: I64,
           counts: I64, block: slice, time_cap: float, memory_cap: float, objective: str,
           out_values: F64, out_back: I64) -> None:
    """``out[j] = min_i max(values[i], cost_k(i, j))`` for the ends in ``block``."""
    cnt = counts[block]
    offsets = np.cumsum(cnt) - cnt
    total = int(cnt.sum())
    seg = np.repeat(np.arange(len(cnt)), cnt)
    idx = np.repeat(a[block], cnt) + (np.arange(total) - offsets[seg])
    i, j = positions[idx], ends[block][seg]
    time = stage_times(problem, k, i, j) if np.isfinite(time_cap) or objective == "time" else None
    ok = np.ones(total, dtype=bool) if time is None else time <= time_cap
    cost = time if time is not None else np.zeros(total)
    if np.isfinite(memory_cap) or objective == "memory":
        memory = stage_memories(problem, k, i, j)
        ok &= memory <= memory_cap
        if objective == "memory":
            cost = memory.astype(np.float64)
    cand = np.where(ok, np.maximum(values[idx], cost), np.inf)
    best = np.minimum.reduceat(cand, offsets)
    hit = np.where(cand == best[seg], np.arange(total), total)
    arg = np.minimum.reduceat(hit, offsets)
    out_values[block] = best
    out_back[block] = idx[np.minimum(arg, total - 1)]


__all__ = ["capped_dp", "monotone_minmax", "windows"]

