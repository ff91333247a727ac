"""Two forked benchmark ranks on 127.0.0.1: the port, the start, the wait, the result;
and one timed training step on them.

``worker(rank, port, *args, queue)`` runs on each rank; rank 0 puts its result on
``queue``. The parent waits for it while both ranks live, and stops the other
when one fails, so a crashed rank never leaves the benchmark waiting.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two(worker: Callable[..., None], *args: Any) -> Any:
    """``worker(rank, port, *args, queue)`` on 2 forked ranks; what rank 0 put on the queue."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: keep waiting while both ranks live
            if any(p.exitcode not in (None, 0) for p in procs) or not any(p.is_alive() for p in procs):
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                raise SystemExit(f"a benchmark rank failed: exit codes {[p.exitcode for p in procs]}") from None
    for p in procs:
        p.join()
    return result


class Step(NamedTuple):
    slowest: float  # the slowest rank's step time
    local: float  # this rank's
    delay: float  # the most any rank waited for its core during the step
    timeline: list[tuple[float, float, int, str]]


def run_delay() -> float:
    """Seconds this thread has waited on a run queue (time other processes took from its core)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) * 1e-9
    except OSError:
        return 0.0


def timed_step(pipe: Any, batch: tuple[tuple[Any, ...], dict[str, Any], Any]) -> Step:
    """One training step of ``pipe`` between barriers: the slowest rank's time, this rank's,
    the most any rank waited for its core, and this rank's timeline."""
    args, kwargs, target = batch
    for p in pipe.parameters():
        p.grad = None
    dist.barrier()
    d0, t0 = run_delay(), time.perf_counter()
    pipe.step(*args, target=target, **kwargs)
    local = time.perf_counter() - t0
    worst = torch.tensor([local, run_delay() - d0], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return Step(float(worst[0]), local, float(worst[1]), pipe.timeline())
