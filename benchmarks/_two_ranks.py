"""Two forked benchmark ranks on 127.0.0.1: the port, the start, the wait, the result.

``worker(rank, port, *args, queue)`` runs on each rank; rank 0 puts its result on
``queue``. The parent waits for it while both ranks live, and stops the other
when one fails, so a crashed rank never leaves the benchmark waiting.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from typing import Any


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
