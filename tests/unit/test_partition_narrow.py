"""The capped DP's narrowing (search._narrow) returns exactly what the full DP does:
same value, same cuts (ties broken the same way), on chains where one node dominates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipec.partitioner import search
from pipec.partitioner.algorithm import solve
from pipec.partitioner.problem import ChainProblem, ChainTensor, ParamGroup


def link(num_bytes: int, src: int, dst: int) -> float:
    return 0.0 if src == dst else 8e-6 + num_bytes / 4.5e11


def chain(seed: int, *, huge: bool) -> ChainProblem:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 600))
    times = rng.uniform(10e-6, 100e-6, n)
    if seed % 3 == 0:
        times = np.round(times * 2e4) / 2e4  # many equal times: ties
    if huge:
        times[int(rng.integers(n // 2, n))] = times.sum() * 0.3  # an LM head
    tensors = []
    for p in range(n - 1):
        readers = {p + 1} | ({p + 40} if p % 50 == 0 and p + 40 < n else set())
        tensors.append(ChainTensor(p, tuple(sorted(readers)), int(rng.integers(1, 5)) * 2**20))
    tensors.append(ChainTensor(0, tuple(range(100, n, 100)), 4096, is_floating=False))
    tied = ParamGroup(2**24, 2**22, (1, n - 2))
    return ChainProblem(compute_time=tuple(times.tolist()), num_stages=int(rng.integers(2, 17)),
                        tensors=tuple(tensors), params=(tied,), comm_time=link,
                        cuttable=tuple(bool(x) for x in rng.random(n + 1) < 0.9),
                        saved_bytes=tuple(int(x) for x in rng.integers(0, 2**22, n)), num_microbatches=8)


@pytest.mark.parametrize("seed", range(8))
def test_narrowed_dp_equals_full_dp(seed: int) -> None:
    p = chain(seed, huge=seed % 2 == 0)
    total = sum(p.compute_time)
    memory = [math.inf] * p.num_stages
    tight = [float(sum(p.saved_bytes or ())) / p.num_stages * 3] * p.num_stages
    for cap in (total / p.num_stages * 1.1, max(p.compute_time) * 1.01, total):
        for caps in (memory, tight):
            narrowed = search.capped_dp(p, time_cap=cap, memory_caps=caps)
            assert narrowed == search.capped_dp(p, time_cap=cap, memory_caps=caps, narrow_from=10**9)


def test_one_huge_node_takes_a_stage_quickly() -> None:
    """10k nodes, 16 stages, one node 20% of the work: the full DP took ~12 s (now ~0.2 s)."""
    rng = np.random.default_rng(0)
    n = 10_000
    times = rng.uniform(10e-6, 100e-6, n)
    times[n - 5] = times.sum() * 0.2
    tensors = tuple(ChainTensor(i, (i + 1,), 2**20) for i in range(n - 1))
    p = ChainProblem(compute_time=tuple(times.tolist()), num_stages=16, tensors=tensors, comm_time=link)
    assert solve(p).bottleneck < max(times) * 1.01
