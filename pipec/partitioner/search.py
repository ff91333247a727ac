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

The cap alone leaves wide windows when one node is much longer than the
average stage (an LM head): every stage may then span many nodes, and the
pairs grow with their square. :func:`_narrow` keeps, per end ``j``, only the
starts that can attain its minimum -- exactly: a few starts near where the
previous stages' best value meets this stage's compute time give an upper
bound ``u`` on the minimum; a start whose compute time alone, or whose
previous value, exceeds ``u`` costs more than the minimum (communication
only adds), so it is neither the minimum nor the first start attaining it.
Values and back-pointers are those of the full DP, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pipec.partitioner.chain import stage_memories, stage_times
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_SLACK = 1e-9  # relative: window bounds include pairs a rounding error away from the cap
_CHUNK = 1 << 20  # pairs evaluated per numpy call
_PROBES = (-1, 0, 1)  # starts tried around the second crossing for an upper bound
NARROW_FROM = 16  # ends with fewer candidate starts are relaxed in full


def _room(problem: ChainProblem) -> tuple[I64, I64, I64]:
    """``prev[x]``/``next[x]``: the nearest allowed cut <= / >= x; ``cuts``: the allowed interior cuts."""
    tab = tables_of(problem)
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
    tab = tables_of(problem)
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
    narrow_from: int = NARROW_FROM,
) -> tuple[float, tuple[int, ...]] | None:
    """Exact min over splits meeting the caps of the largest stage ``objective``
    (``"time"`` or ``"memory"``); ``(value, cuts)``, or None when no split meets them.
    Ends with more than ``narrow_from`` candidate starts are narrowed first (the
    result is the same; a huge ``narrow_from`` relaxes every start, for tests)."""
    win = windows(problem, time_cap, memory_caps)
    if win is None:
        return None
    lo, hi = win
    tab = tables_of(problem)
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
        if objective == "time":
            a, counts = _narrow(problem, k, positions, values, ends, a, counts, time_cap, memory_caps[k],
                                narrow_from)
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
    """Consecutive ranges of ``counts`` of about ``_CHUNK`` pairs each (at most ``_CHUNK``
    plus one end's count); each end is relaxed on its own, so any grouping gives the same result."""
    if len(counts) == 0:
        return []
    before = np.cumsum(counts) - counts  # pairs ahead of each end
    total = int(before[-1] + counts[-1])
    edges = np.unique(np.searchsorted(before, np.arange(0, total, _CHUNK), side="right") - 1)
    bounds = [*edges[edges > 0].tolist(), len(counts)]
    return [slice(lo, hi) for lo, hi in zip([0, *bounds[:-1]], bounds)]


def _relax(problem: ChainProblem, k: int, positions: I64, values: F64, ends: I64, a: I64,
           counts: I64, block: slice, time_cap: float, memory_cap: float, objective: str,
           out_values: F64, out_back: I64) -> None:
    """``out[j] = min_i max(values[i], cost_k(i, j))`` for the ends in ``block``."""
    cnt = counts[block]
    offsets = np.cumsum(cnt) - cnt
    total = int(cnt.sum())
    seg = np.repeat(np.arange(len(cnt)), cnt)
    idx = np.repeat(a[block], cnt) + (np.arange(total) - offsets[seg])
    cand = _candidates(problem, k, positions[idx], ends[block][seg], values[idx], time_cap, memory_cap, objective)
    best = np.minimum.reduceat(cand, offsets)
    hit = np.where(cand == best[seg], np.arange(total), total)
    arg = np.minimum.reduceat(hit, offsets)
    out_values[block] = best
    out_back[block] = idx[np.minimum(arg, total - 1)]


def _candidates(problem: ChainProblem, k: int, i: I64, j: I64, before: F64, time_cap: float,
                memory_cap: float, objective: str) -> F64:
    """``max(before, cost_k(i, j))`` per pair, inf where the pair breaks a cap."""
    time = stage_times(problem, k, i, j) if np.isfinite(time_cap) or objective == "time" else None
    ok = np.ones(len(i), dtype=bool) if time is None else time <= time_cap
    cost = time if time is not None else np.zeros(len(i))
    if np.isfinite(memory_cap) or objective == "memory":
        memory = stage_memories(problem, k, i, j)
        ok &= memory <= memory_cap
        if objective == "memory":
            cost = memory.astype(np.float64)
    out: F64 = np.where(ok, np.maximum(before, cost), np.inf)
    return out


def _narrow(problem: ChainProblem, k: int, positions: I64, values: F64, ends: I64, a: I64, counts: I64,
            time_cap: float, memory_cap: float, narrow_from: int) -> tuple[I64, I64]:
    """Per end ``j``, the sub-range of its starts ``positions[a : a + counts]`` that can
    attain ``min_i max(values[i], time_k(i, j))`` (see the module docstring); same ``(a, counts)`` form.

    Why it is exact: ``time_k(i, j) >= compute(i, j)`` in floating point too (it adds
    terms >= 0 to the very ``compute`` computed here), so with ``u`` the candidate
    value of some start, a start with ``compute(i, j) > u`` or ``values[i] > u`` has
    a candidate value ``> u >= min``.
    """
    wide = np.flatnonzero(counts > narrow_from)
    if len(wide) == 0:
        return a, counts
    pt = tables_of(problem).prefix_time
    speed = tables_of(problem).speed[k]
    full_a, full_counts = a, counts
    a, b, ends = a[wide], a[wide] + counts[wide], ends[wide]
    at_start, at_end = pt[positions], pt[ends]

    def compute(idx: I64) -> F64:  # exactly the compute term of stage_times
        c: F64 = (at_end - at_start[idx]) / speed
        return c

    # best previous value over every later start: non-decreasing, so searchable
    suffix_min = np.minimum.accumulate(values[::-1])[::-1]
    # where the previous value meets this stage's compute time (``suffix_min[x] >= compute(x)``,
    # rearranged), then where it meets compute plus the transfers there: the minimum is near
    level = suffix_min + at_start / speed
    cross = np.clip(np.searchsorted(level, at_end / speed), a, b - 1)
    time = stage_times(problem, k, positions[cross], ends)
    upper = np.where((time <= time_cap) & (memory_cap == np.inf), np.maximum(values[cross], time), np.inf)
    again = np.searchsorted(level, at_end / speed + (time - compute(cross)))
    probes = np.concatenate([np.clip(again + d, a, b - 1) for d in _PROBES])
    tried = _candidates(problem, k, positions[probes], np.tile(ends, len(_PROBES)), values[probes],
                        time_cap, memory_cap, "time")
    upper = np.minimum(upper, tried.reshape(len(_PROBES), len(ends)).min(axis=0))
    bounded = np.isfinite(upper)
    # first start whose compute time is within the bound (compute falls as the start rises)
    lo: I64 = a.copy()
    hi: I64 = b.copy()
    while (active := lo < hi).any():
        mid = (lo + hi) // 2
        yes = compute(np.minimum(mid, b - 1)) <= upper
        hi = np.where(active & yes, mid, hi)
        lo = np.where(active & ~yes, mid + 1, lo)
    stop = np.searchsorted(suffix_min, upper, side="right")
    new_a, new_counts = full_a.copy(), full_counts.copy()
    new_a[wide] = np.where(bounded, np.maximum(a, lo), a)
    new_counts[wide] = np.where(bounded, np.minimum(b, stop), b) - new_a[wide]
    return new_a, new_counts



def min_memory_limit(problem: ChainProblem) -> tuple[int, bool]:
    """The smallest per-rank memory limit for which some split fits, ignoring time.

    Returns ``(bytes, exact)``: exact (the minimum over splits of the largest
    stage memory) with one stage per rank; with several stages per rank the
    per-stage minimum is returned as a lower bound (``exact`` False).
    Phase: partition, used for the advice of an infeasible-memory error.
    """
    if len(problem.recompute) > 1:  # each stage then takes the policy that needs the least memory
        problem = dataclasses.replace(problem, memory_limit=(1,) * problem.ranks)
    tab = tables_of(problem)
    s = problem.num_stages
    prefixes = [tab.prefix_memory(k).astype("float64") for k in range(s)]
    lower, _ = monotone_minmax(problem, prefixes)
    result = None
    for cap in [float(lower) * f for f in (1.0, 1.05, 1.25, 2.0, 4.0, 16.0)] + [float("inf")]:
        result = capped_dp(problem, time_cap=float("inf"), memory_caps=[cap] * s, objective="memory")
        if result is not None:
            break
    if result is None:  # unreachable when enough cut positions exist; keep a bound
        return int(lower), False
    return int(result[0]), problem.ranks == s

__all__ = ["capped_dp", "min_memory_limit", "monotone_minmax", "windows"]

