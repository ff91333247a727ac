"""How fast the optimal partitioner is on large synthetic chains.

Chains of nodes with random compute times (10-100 us), activations of 1-4 MiB
passed to the next node, plus (``skips``) residual-style skips every 50 nodes
over 40 nodes, long U-Net-style skips every 5,000 nodes over 2,000 nodes and
one integer mask read every 100 nodes; links of an H100 node (8 us + bytes /
450 GB/s). Prints the median of a few runs of building the tables and of
solving, and the bottleneck against ``max(total / num_stages, largest node)``.

Goals: 10k nodes -> 16 stages < 1 s; 100k nodes -> 64 stages with skips < 10 s.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/partition_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pipec.partitioner.algorithm import solve
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem, ChainTensor

MIB = 2**20


def link(num_bytes: int, src: int, dst: int) -> float:
    return 0.0 if src == dst else 8e-6 + num_bytes / 4.5e11


def chain(num_nodes: int, num_stages: int, *, skips: bool, seed: int = 0) -> tuple[float, ChainProblem]:
    """``(seconds to construct and validate the ChainProblem, problem)``."""
    rng = np.random.default_rng(seed)
    times = rng.uniform(10e-6, 100e-6, num_nodes)
    sizes = rng.integers(1, 5, num_nodes) * MIB
    tensors = []
    for p in range(num_nodes - 1):
        readers = {p + 1}
        if skips and p % 50 == 0 and p + 40 < num_nodes:
            readers.add(p + 40)
        if skips and p % 5000 == 0 and p + 2000 < num_nodes:
            readers.add(p + 2000)
        tensors.append(ChainTensor(p, tuple(sorted(readers)), int(sizes[p])))
    if skips:
        tensors.append(ChainTensor(0, tuple(range(100, num_nodes, 100)), 4096, is_floating=False))
    started = time.perf_counter()
    problem = ChainProblem(compute_time=tuple(times.tolist()), num_stages=num_stages, tensors=tuple(tensors),
                           saved_bytes=tuple(sizes.tolist()), comm_time=link, num_microbatches=num_stages * 2)
    return time.perf_counter() - started, problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'nodes':>7} {'stages':>6} {'skips':>5} {'check s':>8} {'tables s':>9} {'solve s':>8} "
          f"{'total s':>8} {'goal s':>6} {'bottleneck/lb':>13}")
    for num_nodes, num_stages, skips, goal in ((10_000, 16, False, 1.0), (10_000, 16, True, 1.0),
                                               (100_000, 64, True, 10.0)):
        check, build, run, total_time = [], [], [], []
        ratio = 0.0
        for seed in range(args.repeats):
            checked, problem = chain(num_nodes, num_stages, skips=skips, seed=seed)
            started = time.perf_counter()
            tables_of(problem)  # builds the liveness tables
            built = time.perf_counter()
            solution = solve(problem)
            done = time.perf_counter()
            check.append(checked)
            build.append(built - started)
            run.append(done - built)
            total_time.append(checked + done - started)
            total = sum(problem.compute_time)
            ratio = solution.bottleneck / max(total / num_stages, max(problem.compute_time))
        print(f"{num_nodes:>7} {num_stages:>6} {str(skips):>5} {statistics.median(check):>8.3f} "
              f"{statistics.median(build):>9.3f} {statistics.median(run):>8.3f} "
              f"{statistics.median(total_time):>8.3f} {goal:>6.1f} {ratio:>13.4f}")


if __name__ == "__main__":
    main()
