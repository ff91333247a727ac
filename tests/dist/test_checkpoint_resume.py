"""Resuming from a checkpoint is bit-identical, and a checkpoint outlives its plan's layout.

A tied-weight chain on 2 Gloo ranks trains 6 steps with Adam on batches drawn
from torch's, Python's and numpy's generators (so RNG state matters too):

- A: 6 steps without a break;
- B: 3 steps, a checkpoint, one more step, then both processes are SIGKILLed
  in the middle of the next one;
- C: new processes load the checkpoint (parameters, optimizer, RNG) and train
  the last 3 steps, then save again.

Every parameter of C equals A's exactly (``torch.equal``). C's checkpoint
merges into the original model's state dict (``strict=True``), and loads into
a 3-stage plan of the same model on 3 ranks, which holds the same values and
Adam state for every parameter (an optimizer of other param groups is refused).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _handmade import Chain, chain_plan
from _workers import run_ranks
from test_failure_detection import run_with_faults

from pipec.schedule.generators import make_schedule

STEPS, SAVED = 6, 3

# the first optimizer imports torch._dynamo (3 s); do it once here, not in every forked rank
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def _plan(bounds: list[int]) -> Any:
    torch.manual_seed(0)
    stages = len(bounds) - 1
    return chain_plan(Chain(4, tied=True), make_schedule("1f1b", stages, 4), batch=8, bounds=bounds, tied=True)


def _train(rank: int, world_size: int, directory: str, mode: str) -> dict[str, torch.Tensor]:
    from pipec.errors import RuntimeFailure
    from pipec.runtime.runtime import PipelineRuntime

    step = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if mode == "interrupted" and step["n"] == SAVED + 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1, in the middle of a step
        return ((out - y) ** 2).mean()

    pipe = PipelineRuntime(_plan([0, 2, 4]), loss_fn)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    first = pipe.load_checkpoint(directory, optimizer=optimizer) if mode == "resumed" else 0
    for step["n"] in range(first, STEPS):
        if mode == "interrupted" and step["n"] == SAVED:
            pipe.save_checkpoint(directory, optimizer=optimizer, step=SAVED)
        x = torch.randn(8, 8) * (1 + random.random()) + float(np.random.rand())
        y = torch.randn(8, 8)
        try:
            pipe.step(x, target=y)
        except RuntimeFailure:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0, once rank 1 is gone
        optimizer.step()
        optimizer.zero_grad()
    if mode == "resumed":
        pipe.save_checkpoint(directory, optimizer=optimizer)  # step defaults to the steps run: 6
    return {n: p.detach().clone() for n, p in pipe.named_parameters()}


def _load_elsewhere(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    from pipec.errors import CheckpointError
    from pipec.runtime.runtime import PipelineRuntime

    pipe = PipelineRuntime(_plan([0, 1, 3, 4]))
    step = pipe.load_checkpoint(directory)
    optimizer = torch.optim.Adam(pipe.parameters())
    pipe.load_checkpoint(directory, optimizer=optimizer)  # resharded by FQN (test_reshard checks the values)
    state = sorted(n for n, p in pipe.named_parameters() if "exp_avg" in optimizer.state.get(p, {}))
    refused = ""
    try:
        pipe.load_checkpoint(directory, optimizer=torch.optim.Adam([{"params": [p]} for p in pipe.parameters()]))
    except CheckpointError as e:
        refused = str(e)
    return {"step": step, "refused": refused, "state": state,
            "params": {n: p.detach().clone() for n, p in pipe.named_parameters()}}


@pytest.mark.timeout(120)
def test_resume_is_bit_identical_and_loads_into_another_layout(tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpt")
    straight = run_ranks(_train, 2, directory + "-unused", "straight")
    assert run_with_faults(_train, 2, directory, "interrupted", survivors=[], linger=60) == [None, None]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000003"
    resumed = run_ranks(_train, 2, directory, "resumed")
    for rank in range(2):
        assert set(resumed[rank]) == set(straight[rank])
        for name, value in straight[rank].items():
            assert torch.equal(resumed[rank][name], value), (rank, name)
    expected = {n: v for part in straight for n, v in part.items()}

    from pipec.runtime.checkpoint import merge_checkpoint

    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000006"
    merged = merge_checkpoint(directory, _plan([0, 2, 4]))
    torch.manual_seed(5)
    model = Chain(4, tied=True)
    model.load_state_dict(merged, strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name

    three = run_ranks(_load_elsewhere, 3, directory)
    assert [r["step"] for r in three] == [STEPS] * 3
    assert {n for r in three for n in r["state"]} == set(expected)  # Adam state for every parameter (tied: on each holder)
    assert all("param group" in r["refused"] for r in three if len(r["state"]) > 1), [r["refused"] for r in three]
    loaded = {n: v for r in three for n, v in r["params"].items()}
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
