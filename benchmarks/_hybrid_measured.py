"""Data x pipeline parallelism on this machine (issue #15, part a; ``benchmarks/hybrid.py
--part a``): DP2 x PP1 vs DP1 x PP2 vs one process, measured against ``plan.simulate()``.

    PYTHONPATH=. python benchmarks/hybrid.py --part a [--steps 12] [--warmup 3] [--rounds 3] [--cost-model profile]

One MLP (a global batch of 64) is planned three ways, costed by profiling on this
machine (``--cost-model cpu``: the analytic CPU model);
each configuration runs ``--steps`` training steps on Gloo (OMP_NUM_THREADS=1 per
process), rounds alternating the configurations so a noisy neighbour hits all
alike. The step time is the median of the steps after ``--warmup``, over every
round, on the slowest rank. Predicted: ``plan.simulate().step_time``, which for
D = 2 includes each stage's gradient all-reduce across the replicas (a ring on
the cost model's links, from the stage's last backward on).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.microbatch import replica_share

BATCH, WIDTH, DEPTH = 64, 512, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def _worker(rank: int, world: int, port: int, plan: pipec.Plan, steps: int, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    pipe = pipec.PipelineRuntime(plan, F.mse_loss, backend="gloo")
    d, size = pipe.data_parallel_rank, pipe.data_parallel_size
    x, y = replica_share(x, size, d), replica_share(y, size, d)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        pipe.step(x, target=y)
        times.append(time.perf_counter() - started)
    if pipe.info.distributed:
        torch.distributed.barrier()
    pipe.close()
    out.put((rank, times))
    if pipe.info.distributed:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(plan: pipec.Plan, steps: int) -> list[list[float]]:
    world = plan.data.world_size
    if world == 1:
        queue: Any = mp.get_context("fork").SimpleQueue()
        _worker(0, 1, 0, plan, steps, queue)
        return [queue.get()[1]]
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, plan, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(60)
    return [results[r] for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cost-model", default="profile", help="profile (default: measured here) or a name, e.g. cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    model = _model()
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    configs = {
        "one process": dict(num_stages=1, data_parallel=1, num_microbatches=1),
        "DP1 x PP2": dict(num_stages=2, data_parallel=1, num_microbatches=4),
        "DP2 x PP1": dict(num_stages=1, data_parallel=2, num_microbatches=1),
    }
    plans = {k: pipec.partition(model, (x,), target=y, loss_fn=F.mse_loss, cost_model=args.cost_model, **c)  # type: ignore[arg-type]
             for k, c in configs.items()}
    measured: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(args.rounds):
        for key, plan in plans.items():  # alternated: each round runs every configuration once
            per_rank = _run(plan, args.steps)
            slowest = [max(r[i] for r in per_rank) for i in range(args.warmup, args.steps)]
            measured[key] += slowest
    print(f"MLP {DEPTH}x{WIDTH}, global batch {BATCH}, Gloo on this machine ({os.cpu_count()} CPUs), "
          f"median of {args.rounds} x {args.steps - args.warmup} steps after {args.warmup} warm-up")
    print(f"{'configuration':<14} {'processes':>9} {'measured ms':>12} {'simulated ms':>13} {'error':>7}")
    for key, plan in plans.items():
        sim = plan.simulate().step_time * 1e3
        got = statistics.median(measured[key]) * 1e3
        print(f"{key:<14} {plan.data.world_size:>9} {got:>12.2f} {sim:>13.2f} {(sim - got) / got:>+7.0%}")


if __name__ == "__main__":
    main()
