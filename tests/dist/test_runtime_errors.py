"""Failures across ranks: a rank that fails names itself, the others fail instead of hanging."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _handmade import Chain, chain_plan
from _workers import run_ranks

from pipec.schedule.generators import make_schedule


def _failing_run(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    from pipec.errors import ConfigError, RuntimeFailure
    from pipec.runtime.runtime import PipelineRuntime

    report: dict[str, Any] = {}
    # 1. a plan for 4 ranks in a group of 2
    torch.manual_seed(0)
    try:
        PipelineRuntime(chain_plan(Chain(4), make_schedule("1f1b", 4, 4), batch=8, bounds=[0, 1, 2, 3, 4]))
    except ConfigError as e:
        report["world"] = str(e)
    dist.barrier()

    # 2. the last rank's loss function raises in step 1 (after a good step 0)
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 4:
            raise ValueError("loss exploded")
        return ((out - y) ** 2).mean()

    torch.manual_seed(0)
    pipe = PipelineRuntime(chain_plan(Chain(2), make_schedule("1f1b", 2, 4), batch=8, bounds=[0, 1, 2]), loss_fn)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    pipe.step(x, target=y)
    try:
        pipe.step(x, target=y)
    except RuntimeFailure as e:
        report["failure"] = (e.rank, e.action, e.step, str(e))
        if rank == 1:
            # leave the group so the peer blocked in a receive sees the connection close
            dist.destroy_process_group()
    return report


@pytest.mark.timeout(90)
def test_rank_failure_is_reported_and_peers_do_not_hang() -> None:
    reports = run_ranks(_failing_run, 2, timeout=75)
    for r in reports:
        assert "plan runs on 4 ranks but the process group has 2" in r["world"]
    rank, action, step, message = reports[1]["failure"]
    assert (rank, action, step) == (1, "1F0", 1)
    assert "loss exploded" in message
    # rank 0 was waiting for a gradient from rank 1: it fails at that receive
    rank0, action0, step0, _ = reports[0]["failure"]
    assert (rank0, action0, step0) == (0, "0RECV_B0", 1)
