"""Phase partition: the exact min-max split of a chain problem, and the strategy switch.

Input: a :class:`ChainProblem`. Output: a :class:`ChainSolution` -- cut
positions plus each stage's time and memory as
:mod:`pipec.partitioner.chain` defines them.

``optimal`` minimises the pipeline's clock, the slowest stage time, subject to
per-rank memory limits, allowed cut positions and device speeds:

1. a lower bound: the exact min-max of compute time alone
   (:func:`~pipec.partitioner.search.monotone_minmax`; communication is >= 0);
2. an upper bound: the best memory-feasible split among that compute-optimal
   one and the baselines, costed in full, then improved by moving one cut at
   a time (:func:`polish`);
3. the exact DP (:func:`~pipec.partitioner.search.capped_dp`) under caps that
   grow from the lower to the upper bound; the first cap that admits a split
   yields the optimum (the cap only prunes pairs that cannot be in a split
   that beats it). A smaller cap is only tried when its windows hold far
   fewer pairs than the upper bound's. With a tight bracket the windows hold
   few pairs: a 100k-node chain into 64 stages takes about a second. The
   work grows with the slack ``num_stages * bottleneck - total``: a graph
   whose bottleneck is one huge node (an LM head) costs more.

PipeDream's DP (Narayanan et al. 2019 §3.1), Alpa's stage DP (Zheng et al.
2022 §5) and torchgpipe's block partition (Lee et al. 2020 §3.3) solve the
same min-max over contiguous segments; here the stage cost also counts
direct skip transfers, tied-gradient exchange and memory under the schedule.

**Recompute chosen with the split** (``recompute="auto"``): AdaPipe (Sun et
al., "AdaPipe: Optimizing Pipeline Parallel Training with Adaptive Recomputation
and Partitioning", ASPLOS 2024, §4) chooses the partition and each stage's
recomputation together. Here a stage's cost (:func:`pipec.partitioner.chain.stage_policies`)
already takes, per candidate segment, the fastest policy among ``none``,
``selective`` and ``full`` whose memory fits the stage's rank; the DP over
contiguous splits then minimises the bottleneck over splits *and* policies.
That is exact when each rank holds one stage: a stage's policy changes only its
own time and memory, so, given the split, choosing per stage is optimal, and
every split is priced with its best policies. (The memory-pruning bounds use,
per node, the least any policy keeps, so no split is pruned wrongly.) AdaPipe
chooses recomputation per layer inside a stage; pipec chooses among three
policies per stage, a coarser space searched exactly.

Several stages per rank (interleaved) couple their memory: the DP checks each
stage against its rank's limit (a relaxation), and when the optimum it finds
overflows a rank, small problems (<= 20,000 splits) are searched exhaustively
(exact); larger ones get each stage ``limit / stages_on_that_rank`` (a split
that fits, possibly not optimal -- the solution's ``exact`` is False and a
warning is logged -- and one that may miss a fitting split that shares a
rank's memory unevenly).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from pipec.errors import PartitionError
from pipec.partitioner.baselines import BASELINES
from pipec.partitioner.chain import evaluate, fits, stage_memories, stage_times
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem, ChainSolution
from pipec.partitioner.search import capped_dp, min_memory_limit, monotone_minmax, windows
from pipec.units import format_bytes

log = logging.getLogger(__name__)

STRATEGIES = ("optimal", "equal-count", "by-params", "greedy")
EXHAUSTIVE_LIMIT = 20_000  # coupled ranks: enumerate the splits when there are at most this many
_INF = float("inf")


def solve(problem: ChainProblem, strategy: str = "optimal") -> ChainSolution:
    """Split ``problem`` with ``strategy`` (one of :data:`STRATEGIES`)."""
    if strategy not in STRATEGIES:
        raise PartitionError(f"strategy: expected one of {', '.join(STRATEGIES)}, found {strategy!r}")
    check_cut_count(problem)
    if strategy == "optimal":
        return optimal(problem)
    solution = evaluate(problem, BASELINES[strategy](problem), strategy)
    if not fits(problem, solution):
        log.warning("the %s split exceeds the memory limit on some rank (%s); strategy='optimal' "
                    "respects it", strategy, ", ".join(format_bytes(m) for m in solution.rank_memory))
    return solution


def check_cut_count(problem: ChainProblem) -> None:
    """PartitionError unless there are at least ``num_stages - 1`` allowed cuts."""
    inner = problem.cut_positions()
    if len(inner) < problem.num_stages - 1:
        raise PartitionError(
            f"num_stages={problem.num_stages} needs {problem.num_stages - 1} cut positions, but only "
            f"{len(inner)} of the {problem.num_nodes - 1} positions between nodes can be cut (elsewhere "
            "a value that is not a plain tensor, such as an int from x.size(0) or a tuple, is live); "
            f"use num_stages <= {len(inner) + 1}"
        )


def optimal(problem: ChainProblem, *, exhaustive_limit: int = EXHAUSTIVE_LIMIT, explain: bool = True) -> ChainSolution:
    """The split with the smallest bottleneck that fits memory (see the module docstring).
    Stages sharing a rank whose memory together overflows it: the splits are enumerated
    when at most ``exhaustive_limit``, else a split that fits is searched (not exact).
    ``explain=False``: when nothing fits, a PartitionError without the smallest limit
    that would (a search of its own; the hybrid search tries many configurations)."""
    tab = tables_of(problem)
    s = problem.num_stages
    caps = [_limit(problem, k) for k in range(s)]
    lower, compute_cuts = monotone_minmax(problem, [tab.prefix_time / tab.speed[k] for k in range(s)])
    candidates = [evaluate(problem, cuts, "optimal")
                  for cuts in (compute_cuts, *(f(problem) for f in BASELINES.values()))]
    candidates.sort(key=lambda c: (not fits(problem, c), c.bottleneck))
    candidates.append(evaluate(problem, polish(problem, candidates[0].cuts, caps), "optimal"))
    upper = min((c.bottleneck for c in candidates if fits(problem, c)), default=_INF)
    found = None
    for cap in _worthwhile(problem, _caps(problem, lower, upper), caps):
        found = capped_dp(problem, time_cap=cap, memory_caps=caps)
        if found is not None:
            break
    if found is None:
        raise infeasible_error(problem) if explain else PartitionError("no split fits the memory limit")
    solution = evaluate(problem, found[1], "optimal")
    if not fits(problem, solution):
        solution = _coupled(problem, solution, exhaustive_limit, explain)
    return solution


def polish(problem: ChainProblem, cuts: tuple[int, ...], memory_caps: list[float],
           passes: int = 4) -> tuple[int, ...]:
    """Move one cut at a time to where the two stages beside it have the smaller larger
    time (each stage within its memory cap); a cheap upper bound for the exact search."""
    s = problem.num_stages
    allowed = np.asarray(problem.cut_positions(), dtype=np.int64)
    radius = max(8, problem.num_nodes // (4 * s))
    out = list(cuts)
    for _ in range(passes):
        moved = False
        for k in range(1, s):
            lo, hi = max(out[k - 1] + 1, out[k] - radius), min(out[k + 1] - 1, out[k] + radius)
            cand = allowed[(allowed >= lo) & (allowed <= hi)]
            if len(cand) < 2:
                continue
            left = np.full(len(cand), out[k - 1], dtype=np.int64)
            right = np.full(len(cand), out[k + 1], dtype=np.int64)
            value = np.maximum(stage_times(problem, k - 1, left, cand), stage_times(problem, k, cand, right))
            ok = ((stage_memories(problem, k - 1, left, cand) <= memory_caps[k - 1])
                  & (stage_memories(problem, k, cand, right) <= memory_caps[k]))
            value = np.where(ok | (cand == out[k]), value, _INF)
            best = int(cand[int(np.argmin(value))])
            if value[cand == out[k]][0] > value.min():
                out[k], moved = best, True
        if not moved:
            break
    return tuple(out)


def _limit(problem: ChainProblem, stage: int) -> float:
    limit = problem.limit_of(problem.rank_of(stage))
    return _INF if limit is None else float(limit)


def _caps(problem: ChainProblem, lower: float, upper: float) -> list[float]:
    """Caps to try, smallest first; the last one always admits a split if any exists."""
    first = lower * (1 + 1e-9) + 1e-300
    # with transfers the compute-only bound is (almost) never met: start a little above it
    fractions = (1 / 64, 1 / 8) if problem.comm_time is not None else (0.0, 1 / 64, 1 / 8)
    if math.isfinite(upper):
        steps = [max(first, lower + (upper - lower) * f) for f in fractions]
        return [*sorted({c for c in steps if c < upper}), upper]
    return [first, *(lower * f for f in (1.05, 1.25, 2.0, 4.0, 16.0) if lower * f > first), _INF]


def _worthwhile(problem: ChainProblem, caps: list[float], memory_caps: list[float]) -> list[float]:
    """Drop caps whose windows are not much smaller than the last (sure) cap's: a failed
    attempt costs as much as its windows hold pairs, so it only pays when they are few."""
    def pairs(cap: float) -> float:
        win = windows(problem, cap, memory_caps)
        if win is None:
            return 0.0
        width = (win[1] - win[0] + 1).astype(float)
        return float(np.sum(width[1:] * width[:-1]))

    if not math.isfinite(caps[-1]):
        return caps
    sure = pairs(caps[-1])
    return [c for c in caps[:-1] if pairs(c) * 4 < sure] + caps[-1:]


def infeasible_error(problem: ChainProblem) -> PartitionError:
    """The error for "no split fits memory", with the limit that would fit."""
    need, exact = min_memory_limit(problem)
    limits = sorted({m for m in problem.memory_limit or () if m is not None})
    shown = ", ".join(format_bytes(m) for m in limits)
    how = ("the minimum over splits of the largest rank memory" if exact
           else "a lower bound: with several stages per rank the exact minimum may be higher")
    policies = "/".join(problem.recompute)
    if "full" in problem.recompute:
        advice = ""
    else:
        with_recompute, _ = min_memory_limit(dataclasses.replace(problem, recompute=("none", "selective", "full")))
        advice = (f", or recompute activations (recompute='auto'; with it the smallest limit is "
                  f"{format_bytes(with_recompute)})")
    return PartitionError(
        f"no split of the {problem.num_nodes} nodes into {problem.num_stages} stages fits the memory "
        f"limit ({shown} per rank, schedule {problem.schedule!r}, {problem.num_microbatches} "
        f"micro-batches, recompute {policies}); the smallest per-rank limit that fits is {format_bytes(need)} ({how}). "
        "To fix: raise memory_limit to at least that, use more stages (num_stages), more and smaller "
        "micro-batches, a schedule with fewer micro-batches in flight (1f1b rather than gpipe)"
        f"{advice}"
    )


def _coupled(problem: ChainProblem, relaxed: ChainSolution, exhaustive_limit: int,
             explain: bool = True) -> ChainSolution:
    """Several stages per rank whose memory together exceeds the rank's limit."""
    inner = problem.cut_positions()
    if math.comb(len(inner), problem.num_stages - 1) <= exhaustive_limit:
        cuts = exhaustive(problem)
        if cuts is None:
            raise infeasible_error(problem) if explain else PartitionError("no split fits the memory limit")
        return evaluate(problem, cuts, "optimal")
    share = [0] * problem.ranks
    for k in range(problem.num_stages):
        share[problem.rank_of(k)] += 1
    caps = [_limit(problem, k) / share[problem.rank_of(k)] for k in range(problem.num_stages)]
    found = capped_dp(problem, time_cap=_INF, memory_caps=caps)
    if found is None:
        raise infeasible_error(problem) if explain else PartitionError("no split fits the memory limit")
    log.log(logging.WARNING if explain else logging.INFO,"memory of the stages sharing a rank: the optimal split (bottleneck %.3g s) overflows "
                "a rank; using a split with each stage under limit / stages_on_rank, which may not be "
                "optimal", relaxed.bottleneck)
    return evaluate(problem, found[1], "optimal", exact=False)


def exhaustive(problem: ChainProblem) -> tuple[int, ...] | None:
    """Branch and bound over every split, with per-rank memory summed exactly (small problems)."""
    s, n = problem.num_stages, problem.num_nodes
    inner = np.asarray(problem.cut_positions(), dtype=np.int64)
    limits = [problem.limit_of(r) for r in range(problem.ranks)]
    used = [0] * problem.ranks
    best_value = [_INF]
    best_cuts: list[tuple[int, ...]] = []

    def visit(k: int, start: int, sofar: float, cuts: list[int]) -> None:
        first = int(np.searchsorted(inner, start, side="right"))
        ends = np.array([n], dtype=np.int64) if k == s - 1 else inner[first : len(inner) - (s - 2 - k)]
        if len(ends) == 0:
            return
        starts = np.full(len(ends), start, dtype=np.int64)
        times = stage_times(problem, k, starts, ends)
        memory = stage_memories(problem, k, starts, ends)
        rank = problem.rank_of(k)
        for end, time, mem in zip(ends.tolist(), times.tolist(), memory.tolist()):
            value = max(sofar, time)
            limit = limits[rank]
            if value >= best_value[0] or (limit is not None and used[rank] + mem > limit):
                continue
            used[rank] += mem
            if k == s - 1:
                best_value[0] = value
                best_cuts[:] = [(*cuts, end)]
            else:
                visit(k + 1, end, value, [*cuts, end])
            used[rank] -= mem

    visit(0, 0, 0.0, [0])
    return best_cuts[0] if best_cuts else None


__all__ = ["STRATEGIES", "check_cut_count", "exhaustive", "infeasible_error", "optimal", "solve"]
