"""Gloo's event-loop thread runs under SCHED_BATCH once a PipelineRuntime has connected
(pipec.runtime.gloo_io: woken while the rank's thread holds its connection's lock, it
spun until the next tick, stalling a send or a receive by 1-5 ms). Linux only."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
from _workers import run_ranks
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.runtime.gloo_io import calm_gloo_io_threads, loop_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH and /proc: Linux")


def _loop_policies() -> list[int]:
    return [os.sched_getscheduler(tid) for tid in loop_threads()]


def _worker(rank: int, world: int, plan: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    from pipec.runtime import gloo_io
    from pipec.runtime.runtime import PipelineRuntime

    before = _loop_policies()  # the process group exists: its loop thread too
    pipe = PipelineRuntime(plan, F.mse_loss)
    after = _loop_policies()
    pipe.step(x, target=y)
    return before, after, calm_gloo_io_threads(), gloo_io.YIELD_AFTER_SEND


@pytest.mark.timeout(120)
def test_the_runtime_puts_gloos_loop_thread_under_sched_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(8, 8), torch.randn(8, 2)
    plan = pipec.partition(model, (x,), num_stages=2, num_microbatches=2, schedule="1f1b", loss_fn=F.mse_loss,
                           target=y)
    for before, after, again, yields in run_ranks(_worker, 2, plan, x, y):
        assert len(before) == len(after) >= 1
        assert all(p == os.SCHED_BATCH for p in after)
        assert again == 0  # already set: nothing to change
        assert yields  # sends yield the core once a loop thread is under SCHED_BATCH

