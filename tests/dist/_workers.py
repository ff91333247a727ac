"""Launching a Gloo process group for a test, on 127.0.0.1 with a free port.

Children are forked from the test process (cheap: no second ``import torch``)
and each runs ``fn(rank, world_size, *args)`` inside an initialised process
group; what ``fn`` returns is saved with ``torch.save`` and handed back to the
parent, which fails with the child's traceback when one raises and kills the
children it started when ``timeout`` passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _probe_backward() -> None:
    try:
        torch.ones(1, requires_grad=True).sum().backward()
    except RuntimeError:
        os._exit(1)
    os._exit(0)


_FORK_SAFE: bool | None = None


def fork_is_safe() -> bool:
    """Whether a forked child can still run autograd. A CUDA build of torch
    starts autograd device threads at the first backward, after which a forked
    child cannot backpropagate; the CPU builds CI uses never do."""
    global _FORK_SAFE
    if _FORK_SAFE is None:  # once unsafe, always unsafe: only that is remembered
        p = mp.get_context("fork").Process(target=_probe_backward)
        p.start()
        p.join(60)
        if p.exitcode != 0:
            _FORK_SAFE = False
    return _FORK_SAFE is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out: str,
    args: tuple[Any, ...],
    backend: str | None,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    code = 0
    try:
        if backend is not None:
            import torch.distributed as dist

            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException as e:  # the parent reports it
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, out)
        code = 1
    finally:
        os._exit(code)  # skip atexit handlers inherited from pytest


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str | None = "gloo",
    start_method: str = "fork",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; their results by rank.

    ``backend=None`` starts no process group; use ``start_method="spawn"`` for
    CUDA (a forked child cannot use a CUDA context, and ``fn`` must then be
    importable)."""
    if start_method == "fork" and not fork_is_safe():
        import pytest

        pytest.skip("this process ran autograd on a CUDA build of torch, so forked ranks cannot; "
                    "run tests/dist in a fresh process (or on a CPU build, as CI does)")
    ctx = mp.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, port, paths[r], args, backend))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        reports = [torch.load(p, weights_only=False) if Path(p).exists() else None for p in paths]
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None and not rep["ok"]]
    if failed:
        r, rep = failed[0]
        raise AssertionError(f"rank {r} failed: {rep['error']}\n{rep['traceback']}")
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s (hang?)")
    missing = [r for r, rep in enumerate(reports) if rep is None]
    if missing:
        raise AssertionError(f"ranks {missing} exited without a result (crashed?)")
    return [rep["result"] for rep in reports]


def run_with_faults(fn: Any, world_size: int, *args: Any, survivors: list[int], timeout: float = 60.0,
                    linger: float = 0.0, backend: str | None = "gloo") -> list[Any]:
    """Like :func:`run_ranks`, but ranks may die: their result is None. Waits for
    ``survivors``, then up to ``linger`` seconds for the others to end by themselves,
    then kills whatever is left (a stopped or sleeping rank)."""
    if not fork_is_safe():
        import pytest

        pytest.skip("forked ranks cannot run autograd after this process used CUDA")
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, paths[r], args, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for r in survivors:
            procs[r].join(max(0.0, deadline - time.monotonic()))
        hung = [r for r in survivors if procs[r].is_alive()]
        deadline = time.monotonic() + linger
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        reports = [torch.load(p, weights_only=False) if Path(p).exists() else None for p in paths]
    assert not hung, f"ranks {hung} did not finish within {timeout} s: a hang"
    for r in survivors:
        assert reports[r] is not None, f"rank {r} died"
        assert reports[r]["ok"], f"rank {r} failed: {reports[r]['error']}\n{reports[r]['traceback']}"
    return [rep["result"] if rep is not None else None for rep in reports]
