"""No hang when the c10d store's host goes away, or a rank dies while the others set up.

Launched without torchrun, rank 0 hosts the process group's TCPStore. A
TCPStore client that reconnects to a server that exited retries for the
process group's timeout (30 minutes by default: these ranks use it), and one
whose server is stopped blocks without limit; the runtime's ``timeout`` must
bound both, with a ``PeerFailure`` that names the store's host. And a rank
that dies or fails while its peers set up (the tied-parameter subgroup) or
meet in a checkpoint must stop them, named. Two Gloo ranks on 127.0.0.1; the
survivor must raise before ``run_with_faults`` gives up (a hang fails the test).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import fail_all_reduce, files_cannot_grow
from _handmade import Chain, chain_plan
from _workers import run_with_faults

from pipec.schedule.generators import make_schedule

TIMEOUT = 30.0  # the runtime's timeout: the survivor raises within it, run_with_faults waits 45 s


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _report(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__, "message": str(e),
        "where": (getattr(e, "rank", None), getattr(e, "action", None), getattr(e, "step", None)),
        "failed": (getattr(e, "failed_rank", None), getattr(e, "failed_action", None),
                   getattr(e, "failed_step", None)),
    }


def _wait_for_the_store_to_go() -> None:
    """Until rank 0, which hosts the store, has exited (the connection then fails at once)."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    while True:
        try:
            store.check(["test/never"])
        except RuntimeError:
            return
        time.sleep(0.05)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _scenario(rank: int, world_size: int, kind: str, directory: str = "") -> dict[str, Any]:
    import pipec.runtime.checkpoint as checkpoint
    import pipec.runtime.runtime as runtime_module
    from pipec.errors import PipecError
    from pipec.runtime.runtime import PipelineRuntime

    torch.manual_seed(0)
    tied = kind.startswith("setup_tied") or kind == "allreduce_kill"
    plan = chain_plan(Chain(2, tied=tied), make_schedule("1f1b", 2, 4), batch=8, bounds=[0, 1, 2], tied=tied)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    step = {"n": 0}
    try:
        if kind == "host_exits_during_setup":
            if rank == 0:  # fails fast at its first step (two inputs for one), then exits
                PipelineRuntime(plan, _loss, timeout=TIMEOUT).step(x, x, target=y)
            _wait_for_the_store_to_go()
            PipelineRuntime(plan, _loss, timeout=TIMEOUT)
            return {"type": "built"}
        if kind == "setup_tied_never_starts" and rank == 1:
            _die()
        if kind in ("setup_tied_raise", "setup_tied_kill") and rank == 1:
            def failing_p2p(*args: Any, **kwargs: Any) -> Any:  # after its monitor started
                if kind == "setup_tied_kill":
                    _die()
                raise OSError("injected failure while connecting")

            runtime_module.P2P = failing_p2p  # type: ignore[assignment,misc]
        timeout = 8.0 if kind == "setup_tied_never_starts" else TIMEOUT
        pipe = PipelineRuntime(plan, _loss, timeout=timeout, heartbeat_timeout=2.0)
        if kind == "host_stops_in_step" and rank == 0:
            def stop(module: Any, inputs: Any) -> None:
                if step["n"] == 1:
                    os.kill(os.getpid(), signal.SIGSTOP)

            pipe.stage_modules[0].register_forward_pre_hook(stop)
        if kind == "allreduce_kill" and rank == 1:  # killed in the tied gradients' all-reduce
            fail_all_reduce(lambda: step["n"] == 1, _die)
        if kind == "checkpoint_host_kill" and rank == 0:
            checkpoint.write_atomically = lambda *args, **kwargs: _die()  # type: ignore[assignment]
        for step["n"] in range(2):
            if kind.startswith("checkpoint") and step["n"] == 1:
                # rank 1 killed by the kernel at its first write (SIGXFSZ)
                with files_cannot_grow(kill=True) if kind == "checkpoint_kill" and rank == 1 else nullcontext():
                    pipe.save_checkpoint(directory)
            pipe.step(x, target=y)
    except PipecError as e:
        return _report(e)
    except OSError as e:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": "finished"}


def _check(report: dict[str, Any], *, where: tuple[Any, ...], failed: tuple[Any, ...], says: list[str]) -> None:
    assert report["type"] == "PeerFailure", report
    assert report["where"] == where, report
    assert report["failed"] == failed, report
    for text in says:
        assert text in report["message"], report


def _run(kind: str, survivor: int, *args: Any) -> dict[str, Any]:
    reports = run_with_faults(_scenario, 2, kind, *args, survivors=[survivor], timeout=45.0)
    report: dict[str, Any] = reports[survivor]
    return report


@pytest.mark.timeout(60)
def test_a_rank_building_its_runtime_after_the_store_host_exited_fails_naming_it() -> None:
    # before the fix: FailureMonitor's store.clone() reconnected for 30 minutes
    report = _run("host_exits_during_setup", 1)
    _check(report, where=(1, None, None), failed=(0, None, None),
           says=["rank 0 is unreachable", "c10d store hosted by rank 0", "exited"])


@pytest.mark.timeout(60)
def test_a_stopped_store_host_stops_a_rank_inside_a_step() -> None:
    # before the fix: the monitor thread blocked in the store, and publishing the failure blocked forever
    report = _run("host_stops_in_step", 1)
    _check(report, where=(1, "1RECV_F0", 1), failed=(0, None, 1),
           says=["rank 0 is unreachable", "c10d store hosted by rank 0", "stopped"])


@pytest.mark.timeout(60)
def test_a_rank_that_dies_before_the_tied_subgroup_is_named() -> None:
    # before the fix: the tied-parameter new_group waited for the timeout, then a DistStoreError
    report = _run("setup_tied_kill", 0)
    _check(report, where=(0, None, None), failed=(1, None, None), says=["rank 1 is unreachable", "no heartbeat"])


@pytest.mark.timeout(60)
def test_a_rank_that_never_starts_is_named_after_the_timeout() -> None:
    # a peer without any heartbeat yet is not silent (it may still be loading): the wait's
    # timeout (8 s here) ends it, naming the peer
    report = _run("setup_tied_never_starts", 0)
    _check(report, where=(0, None, None), failed=(1, None, None), says=["rank 1 never started", "within 8 s"])


@pytest.mark.timeout(60)
def test_a_rank_that_fails_while_setting_up_stops_its_peers_with_its_error() -> None:
    reports = run_with_faults(_scenario, 2, "setup_tied_raise", survivors=[0, 1], timeout=45.0)
    _check(reports[0], where=(0, None, None), failed=(1, None, None), says=["injected failure while connecting"])
    assert reports[1]["type"] == "OSError", reports[1]


@pytest.mark.timeout(60)
def test_a_rank_killed_before_the_tied_all_reduce_is_named() -> None:
    report = _run("allreduce_kill", 0)
    _check(report, where=(0, None, 1), failed=(1, None, 1), says=["rank 1 is unreachable"])


@pytest.mark.timeout(60)
def test_a_rank_killed_while_writing_a_checkpoint_is_named(tmp_path: Path) -> None:
    report = _run("checkpoint_kill", 0, str(tmp_path))
    _check(report, where=(0, None, 1), failed=(1, None, 1), says=["rank 1 is unreachable", "no heartbeat"])


@pytest.mark.timeout(60)
def test_the_store_host_killed_while_committing_a_checkpoint_is_named(tmp_path: Path) -> None:
    report = _run("checkpoint_host_kill", 1, str(tmp_path))
    _check(report, where=(1, None, 1), failed=(0, None, 1), says=["rank 0 is unreachable", "c10d store"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, world_size: int, absent: int) -> dict[str, Any]:
    """Rank ``absent`` exits before joining; the other joins through the runtime (torchrun's
    variables are set, no process group yet)."""
    from pipec.errors import PipecError
    from pipec.runtime.runtime import PipelineRuntime

    if rank == absent:
        os._exit(0)
    # the runtime joins by torchrun's variables: rank 0 hosts the store on a port the kernel
    # picks; rank 1 is pointed at a port nobody listens on (rank 0 is gone)
    os.environ["MASTER_PORT"] = "0" if rank == 0 else str(_closed_port())
    plan = chain_plan(Chain(2), make_schedule("1f1b", 2, 4), batch=8, bounds=[0, 1, 2])
    try:
        PipelineRuntime(plan, _loss, timeout=5.0)
    except PipecError as e:
        return _report(e)
    return {"type": "joined"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("absent", [0, 1])
def test_a_rank_that_never_joins_the_process_group_is_a_runtime_failure(absent: int) -> None:
    # before the fix: a torch DistStoreError / DistNetworkError, not a PipecError
    survivor = 1 - absent
    report = run_with_faults(_join, 2, absent, survivors=[survivor], timeout=45.0, backend=None)[survivor]
    assert report["type"] == "RuntimeFailure", report
    assert report["where"] == (survivor, None, None), report
    assert f"rank {survivor} could not join the process group of 2 ranks" in report["message"], report
    if survivor == 1:
        assert "rank 0, which hosts the rendezvous store" in report["message"], report
