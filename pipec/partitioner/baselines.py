"""Phase partition: the baseline strategies pipec is measured against.

Input: a :class:`ChainProblem`. Output: cut positions (``num_stages + 1``),
costed afterwards with the same :func:`pipec.partitioner.chain.evaluate` as
the optimal split. None of them looks at communication or memory.

- ``equal-count``: the same number of nodes per stage (what a user does by
  hand with ``torch.distributed.pipelining`` / Megatron split points).
- ``by-params``: balances parameter counts -- DeepSpeed's
  ``partition_method="parameters"`` (min-max of per-layer parameter counts).
- ``greedy``: fills each stage with nodes until its compute time reaches
  ``total / num_stages`` (scaled by the rank's speed) -- a one-pass time
  balance, the naive form of torchgpipe's ``balance_by_time`` (Lee et al. 2020 §3.3).

Each target is snapped to the nearest allowed cut that keeps every stage non-empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem
from pipec.partitioner.search import monotone_minmax


def snap_cuts(problem: ChainProblem, targets: Sequence[float]) -> tuple[int, ...]:
    """The allowed cuts nearest to ``targets`` (one per interior cut), strictly increasing."""
    s, n = problem.num_stages, problem.num_nodes
    inner = np.asarray(problem.cut_positions(), dtype=np.float64)
    chosen: list[int] = []
    low = 0
    for t, target in enumerate(targets):
        high = len(inner) - (s - 1 - t)  # leave one allowed cut for each later stage boundary
        pos = int(np.clip(np.searchsorted(inner, target), low, high))
        options = [x for x in (pos - 1, pos) if low <= x <= high]
        best = min(options, key=lambda x: (abs(inner[x] - target), x))
        chosen.append(int(inner[best]))
        low = best + 1
    return (0, *chosen, n)


def equal_count(problem: ChainProblem) -> tuple[int, ...]:
    """About ``N / num_stages`` nodes per stage."""
    s, n = problem.num_stages, problem.num_nodes
    return snap_cuts(problem, [k * n / s for k in range(1, s)])


def greedy(problem: ChainProblem) -> tuple[int, ...]:
    """Stage ``k`` ends where the running compute time first reaches its share of the total."""
    tab = tables_of(problem)
    s = problem.num_stages
    share = np.cumsum(tab.speed) / tab.speed.sum() * tab.prefix_time[-1]
    targets = [float(np.searchsorted(tab.prefix_time, share[k - 1], side="left")) for k in range(1, s)]
    return snap_cuts(problem, targets)


def by_params(problem: ChainProblem) -> tuple[int, ...]:
    """Min-max parameter count per stage (a tied group counts at its first user)."""
    tab = tables_of(problem)
    numel = np.diff(tab.prefix_numel).astype(np.float64)
    for users, count in zip(tab.tied_users, tab.tied_numel):
        numel[int(users[0])] += count
    prefix = np.concatenate(([0.0], np.cumsum(numel)))
    _, cuts = monotone_minmax(problem, [prefix] * problem.num_stages)
    return cuts


BASELINES = {"equal-count": equal_count, "by-params": by_params, "greedy": greedy}

__all__ = ["BASELINES", "by_params", "equal_count", "greedy", "snap_cuts"]
