"""Soak test of the stage runtime: many training steps, no growth in memory or open files.

Two Gloo ranks on 127.0.0.1 train a small residual MLP (cut in the middle,
1F1B, Adam) for ``--steps`` steps (default 1,000), optionally saving a
checkpoint every ``--checkpoint-every`` steps. Each rank measures its resident
set size (``/proc/self/statm``) and its open file descriptors
(``/proc/self/fd``) after ``--warmup`` steps and at the end, sampling both every
100 steps in between, and prints them. Goals: RSS grows by less than 5% from
warm-up to the end, and the number of open descriptors does not change.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py [--steps 1000] [--checkpoint-every 100]

``--hybrid`` soaks recovery instead (:func:`hybrid_main`): the same model planned
as DP2 x PP2 on 4 ranks, run through ``pipec run`` twice -- straight through,
and with ``--max-restarts 10`` while a rank (a different one each time) is
SIGKILLed every ``--kill-every`` steps (default 200, half-way between two
checkpoints of ``--checkpoint-every``, default 50). Goals: every step done,
the final parameters equal the uninterrupted run's exactly, every rank's RSS
grows by less than 5% within each of its lives; it prints the time lost per
failure. ``--steps 200 --kill-every 50`` is a quick check::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --hybrid [--steps 1000] [--kill-every 200]
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

PAGE = os.sysconf("SC_PAGE_SIZE")


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def build_plan(args: argparse.Namespace) -> Any:
    import pipec
    from pipec.partitioner.assemble import plan_from_split

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.dim, args.hidden) for _ in range(args.blocks)])
    x = torch.randn(args.batch // args.microbatches, args.dim)
    traced = pipec.trace(model, (x,))
    cost_model = pipec.load_cost_model("cpu")
    first = next(n.name for n in traced.nodes if n.module_path.startswith(f"{args.blocks // 2}"))
    data = plan_from_split(traced, cost_model.node_costs(traced), [first], schedule="1f1b",
                           num_microbatches=args.microbatches, cost_model=cost_model,
                           batch_size=args.batch)
    return pipec.Plan(data, traced=traced, loss_fn=mse)


def rank_main(rank: int, port: int, ckpt: str, args: argparse.Namespace, results: Any) -> None:
    from pipec.runtime.runtime import PipelineRuntime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pipe = PipelineRuntime(build_plan(args), mse)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=1e-4)
    torch.manual_seed(1)
    x, y = torch.randn(args.batch, args.dim), torch.randn(args.batch, args.dim)
    samples: list[tuple[int, int, int]] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        pipe.step(x, target=y)
        optimizer.step()
        optimizer.zero_grad()
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            pipe.save_checkpoint(ckpt, optimizer=optimizer, step=step, keep=2)
        if step == args.warmup or step % 100 == 0 or step == args.steps:
            samples.append((step, rss_bytes(), open_fds()))
    elapsed = time.perf_counter() - start
    results.put((rank, samples, elapsed))
    pipe.close()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=None, help="default: never; 50 with --hybrid")
    parser.add_argument("--hybrid", action="store_true", help="DP2 x PP2 through `pipec run`, ranks killed")
    parser.add_argument("--kill-every", type=int, default=200, help="--hybrid: SIGKILL a rank every K steps")
    parser.add_argument("--max-restarts", type=int, default=10, help="--hybrid: pipec run --max-restarts")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")
    if args.hybrid:
        from _soak_hybrid import hybrid_main

        args.checkpoint_every = 50 if args.checkpoint_every is None else args.checkpoint_every
        return hybrid_main(args)
    args.checkpoint_every = args.checkpoint_every or 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as ckpt:
        procs = [ctx.Process(target=rank_main, args=(r, port, ckpt, args, results)) for r in range(2)]
        for p in procs:
            p.start()
        reports: list[Any] = []
        while len(reports) < len(procs):
            try:
                reports.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    print("FAIL: a rank failed (its traceback is above)")
                    return 1
        for p in procs:
            p.join(60)
    reports.sort()
    ok = True
    print(f"soak: {args.steps} steps on 2 Gloo ranks, {args.blocks} blocks of {args.dim}x{args.hidden}, "
          f"batch {args.batch} in {args.microbatches} micro-batches, checkpoint every "
          f"{args.checkpoint_every or 'never'}")
    for rank, samples, elapsed in reports:
        warm = next(s for s in samples if s[0] == args.warmup)
        end = samples[-1]
        growth = (end[1] - warm[1]) / warm[1]
        fds = sorted({s[2] for s in samples if s[0] >= args.warmup})
        ok = ok and growth < 0.05 and len(fds) == 1
        trace = " ".join(f"{s[0]}:{s[1] / 2**20:.1f}" for s in samples)
        print(f"rank {rank}: {elapsed / args.steps * 1e3:.1f} ms/step; RSS at step {args.warmup} "
              f"{warm[1] / 2**20:.1f} MiB, at step {end[0]} {end[1] / 2**20:.1f} MiB ({growth:+.2%}); "
              f"open fds {warm[2]} -> {end[2]} (seen {fds})")
        print(f"  RSS MiB by step: {trace}")
    print("PASS" if ok else "FAIL: RSS grew by 5% or more, or open file descriptors changed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
