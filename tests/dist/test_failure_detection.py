"""No hang: when one rank raises, dies, stops or stalls, the other raises within seconds.

Two Gloo ranks train a 2-stage chain under 1F1B; at step 2 the last rank (the
one that calls the loss) misbehaves in a real way: it raises and stays alive
with its connections open (so rank 0 can only learn it from the store),
SIGKILLs itself, SIGSTOPs itself, or sleeps; or rank 0 (which hosts the c10d
store here) SIGKILLs itself from a forward pre-hook; or rank 1 fails inside the
tied-gradient all-reduce or while writing a checkpoint (its disk full: see
``_faults``). The survivor must
raise a ``PeerFailure`` naming the failed rank, where it stopped (rank,
action, step) and the failed rank's step -- which also says how it was found
(the store, the heartbeat, a wait's timeout) -- and never hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import fail_all_reduce, files_cannot_grow
from _handmade import Chain, chain_plan
from _workers import run_with_faults

from pipec.schedule.generators import make_schedule

FAULT_STEP = 2


def _misbehave(kind: str) -> None:
    if kind == "raise":
        raise ValueError("loss exploded")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "sleep":
        time.sleep(120)


def _train(rank: int, world_size: int, kind: str, directory: str = "") -> dict[str, Any]:
    from pipec.errors import CheckpointError, RuntimeFailure
    from pipec.runtime.runtime import PipelineRuntime

    step = {"n": 0}
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if step["n"] == FAULT_STEP and calls["n"] % 4 == 1 and kind in ("raise", "kill", "stop", "sleep"):
            _misbehave(kind)
        return ((out - y) ** 2).mean()

    torch.manual_seed(0)
    tied = kind == "tied"
    model = Chain(2, tied=tied)
    plan = chain_plan(model, make_schedule("1f1b", 2, 4), batch=8, bounds=[0, 1, 2], tied=tied)
    pipe = PipelineRuntime(plan, loss_fn, timeout=3.0 if kind == "sleep" else 30.0,
                           heartbeat_timeout=2.0 if kind == "stop" else 30.0)
    if kind == "raise" and rank == 1:  # keep its connections open: rank 0 must watch the store
        assert pipe.monitor is not None
        pipe.monitor.break_connections = lambda: None  # type: ignore[method-assign]
    if kind == "kill_rank0" and rank == 0:
        def pre_hook(module: Any, inputs: Any) -> None:
            if step["n"] == FAULT_STEP:
                os.kill(os.getpid(), signal.SIGKILL)

        pipe.stage_modules[0].register_forward_pre_hook(pre_hook)
    if kind == "tied" and rank == 1:  # the all-reduce of the tied gradients fails
        def fault() -> None:
            raise OSError("injected failure in the all-reduce")

        fail_all_reduce(lambda: step["n"] == FAULT_STEP, fault)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    report: dict[str, Any] = {}
    started = time.monotonic()
    try:
        for step["n"] in range(4):
            started = time.monotonic()
            if kind == "save" and step["n"] == FAULT_STEP:
                # rank 1's disk is full: its files cannot grow ("File too large")
                with files_cannot_grow() if rank == 1 else contextlib.nullcontext():
                    pipe.save_checkpoint(directory, step=step["n"])
            pipe.step(x, target=y)
    except RuntimeFailure as e:
        report = {
            "type": type(e).__name__, "where": (e.rank, e.action, e.step), "message": str(e),
            "failed": (getattr(e, "failed_rank", None), getattr(e, "failed_action", None),
                       getattr(e, "failed_step", None)),
            "elapsed": time.monotonic() - started,
        }
    except (OSError, CheckpointError) as e:
        report = {"type": type(e).__name__, "message": str(e)}
    if kind == "raise":
        # rank 1 stays alive with its connections open until rank 0 has stopped (20 s at
        # most): rank 0 can only learn of the failure from the store
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        if rank == 0:
            store.set("test/rank0_stopped", "1")
        else:
            try:
                pipe.step(x, target=y)
            except RuntimeFailure as e:
                report["again"] = str(e)
            waited = time.monotonic() + 20
            try:
                while not store.check(["test/rank0_stopped"]) and time.monotonic() < waited:
                    time.sleep(0.05)
            except RuntimeError:  # rank 0, which hosts the store, has already exited
                pass
    return report


def _check_survivor(report: dict[str, Any], *, rank: int, action: str | None, failed: tuple[Any, ...],
                    says: str) -> None:
    assert report["type"] == "PeerFailure", report
    assert report["where"] == (rank, action, FAULT_STEP), report
    assert report["failed"] == failed, report
    assert says in report["message"], report


@pytest.mark.timeout(90)
def test_a_rank_that_raises_and_stays_alive_stops_its_peer_through_the_store() -> None:
    reports = run_with_faults(_train, 2, "raise", survivors=[0, 1])
    # what rank 1 raised and where reach rank 0 only through the store (rank 1 kept its
    # connections open): a wait timing out would name neither
    _check_survivor(reports[0], rank=0, action="0RECV_B0", failed=(1, "1F0", FAULT_STEP), says="loss exploded")
    assert reports[1]["where"] == (1, "1F0", FAULT_STEP)
    assert "already failed" in reports[1]["again"]


@pytest.mark.timeout(90)
def test_a_killed_rank_is_named_unreachable() -> None:
    reports = run_with_faults(_train, 2, "kill", survivors=[0])
    assert reports[1] is None
    _check_survivor(reports[0], rank=0, action="0RECV_B0", failed=(1, None, FAULT_STEP), says="unreachable")


@pytest.mark.timeout(90)
def test_a_killed_rank_hosting_the_store_is_named_unreachable() -> None:
    reports = run_with_faults(_train, 2, "kill_rank0", survivors=[1])
    assert reports[0] is None
    _check_survivor(reports[1], rank=1, action="1RECV_F0", failed=(0, None, FAULT_STEP), says="unreachable")


@pytest.mark.timeout(90)
def test_a_stopped_rank_is_found_by_its_missing_heartbeat() -> None:
    reports = run_with_faults(_train, 2, "stop", survivors=[0])
    # found by the heartbeat (2 s), not by the wait's 30 s timeout: the message says which
    _check_survivor(reports[0], rank=0, action="0RECV_B0", failed=(1, None, FAULT_STEP), says="no heartbeat")


@pytest.mark.timeout(90)
def test_a_wait_never_outlasts_its_timeout() -> None:
    reports = run_with_faults(_train, 2, "sleep", survivors=[0])
    _check_survivor(reports[0], rank=0, action="0RECV_B0", failed=(1, None, FAULT_STEP), says="within 3 s")
    # the wait did not give up early (a lower bound: no machine is too fast for it; how
    # late it may be is the run's hang limit, not a threshold here)
    assert reports[0]["elapsed"] >= 3


@pytest.mark.timeout(90)
def test_a_failure_before_the_tied_all_reduce_stops_the_peer_inside_it() -> None:
    reports = run_with_faults(_train, 2, "tied", survivors=[0, 1])
    _check_survivor(reports[0], rank=0, action=None, failed=(1, None, FAULT_STEP), says="injected failure")
    assert reports[1]["type"] == "OSError"


@pytest.mark.timeout(90)
def test_a_rank_that_cannot_write_its_checkpoint_stops_the_others(tmp_path: Path) -> None:
    reports = run_with_faults(_train, 2, "save", str(tmp_path), survivors=[0, 1])
    _check_survivor(reports[0], rank=0, action=None, failed=(1, None, FAULT_STEP), says="File too large")
    # a full disk under safetensors is a SafetensorError: the runtime says what to do
    assert reports[1]["type"] == "CheckpointError" and "check the free space" in reports[1]["message"]
