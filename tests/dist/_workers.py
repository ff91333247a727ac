"""Launching a Gloo process group for a test, on 127.0.0.1.

Children are forked from the test process (cheap: no second ``import torch``)
and each runs ``fn(rank, world_size, *args)`` inside an initialised process
group; what ``fn`` returns is saved with ``torch.save`` and handed back to the
parent, which fails with the child's traceback when one raises and kills the
children it started when ``timeout`` passes.

How children start is decided by the torch build, never by what earlier tests
did: ``fork`` on a CPU build; ``forkserver`` on a CUDA (or ROCm) build, whose
autograd starts device threads at the first backward, after which a forked
child cannot backpropagate. A fork server's children get ``fn`` and its
arguments pickled; a test whose arguments cannot be (a torch.export graph
module) is skipped there -- on every run, whatever ran before it -- and runs
on the CPU builds CI uses. ``PIPEC_TEST_START_METHOD`` overrides the choice
(``forkserver`` on a CPU build shows which tests a CUDA build skips).

Rank 0 hosts the c10d store on a port the kernel picks (port 0) and hands the
number to the other ranks: no port is chosen first and bound later, so no other
process can take it in between.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RENDEZVOUS_TIMEOUT = 60.0


def start_method() -> str:
    """``fork``, or ``forkserver`` on a torch built for a GPU (see the module docstring)."""
    forced = os.environ.get("PIPEC_TEST_START_METHOD")
    if forced:
        return forced
    return "forkserver" if (torch.version.cuda or torch.version.hip) else "fork"


def context(method: str | None = None) -> Any:
    """The multiprocessing context for ranks; a fork server preloads torch, once."""
    ctx = mp.get_context(method or start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch"])
    return ctx


def store_for(rank: int, world_size: int, port: Any) -> Any:
    """The c10d store: rank 0 hosts it on a free port it is given by the kernel and
    writes the number into the shared ``port`` (a ``multiprocessing.Value``); the other
    ranks wait for the number and connect."""
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT)
    if rank == 0:
        store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)
        port.value = store.port
    else:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
        while port.value == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not start the store within {RENDEZVOUS_TIMEOUT} s")
            time.sleep(0.01)
        store = TCPStore("127.0.0.1", port.value, world_size, is_master=False, timeout=timeout)
    os.environ["MASTER_PORT"] = str(port.value)
    return store


def _require_picklable(fn: Callable[..., Any], args: tuple[Any, ...], method: str) -> None:
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps((fn, args))
    except Exception as exc:  # pickle raises several kinds
        import pytest

        pytest.skip(f"ranks start by {method} here (torch built for a GPU, where a forked child cannot "
                    f"run autograd, or PIPEC_TEST_START_METHOD), and this test's arguments cannot be "
                    f"pickled ({type(exc).__name__}: {exc}); it runs where ranks fork, as on CI's CPU torch")


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: Any,
    out: str,
    args: tuple[Any, ...],
    backend: str | None,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
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
            store = store_for(rank, world_size, port)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
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
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; their results by rank.

    ``backend=None`` starts no process group; ``start_method`` defaults to
    :func:`start_method` (pass ``"spawn"`` for CUDA ranks: a forked child cannot use
    a CUDA context, and ``fn`` must then be importable)."""
    ctx = context(start_method)
    if ctx.get_start_method() != "fork":
        _require_picklable(fn, args, ctx.get_start_method())
    port = ctx.Value("i", 0)
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
    ctx = context()
    port = ctx.Value("i", 0)  # rank 0 hosts the store on a port the kernel picks
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


def saved_factory_plan(tmp_path: Path, source: str, name: str, split: Callable[[Any, Any], list[int]]) -> Path:
    """The model of the factory ``source`` (written to ``tmp_path/factory.py``, function
    ``make``) on 2 ranks (1F1B, 4 micro-batches), split by ``split(traced, costs)`` (the
    interior cut positions) under uniform node costs, saved to ``tmp_path/name`` with its factory."""
    import pipec
    from pipec.factory import load_factory
    from pipec.partitioner.assemble import plan_from_split
    from pipec.types import NodeCost

    factory = tmp_path / "factory.py"
    if not factory.exists():
        factory.write_text(source)
    spec = f"{factory}:make"
    made = load_factory(spec)
    traced = pipec.trace(made.model, tuple(t[:2] for t in made.example_inputs))
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}
    data = plan_from_split(traced, costs, split(traced, costs), schedule="1f1b", num_microbatches=4)
    plan = pipec.Plan(data, traced=traced, loss_fn=made.loss_fn)
    return plan.with_factory(spec).save(tmp_path / name)
