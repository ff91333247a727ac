"""The generated run.py trains a saved plan under torchrun (2 Gloo ranks on CPU)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from test_split_models import traced_plan

from pipec.runtime.launch import run_plan

FACTORY = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    return {"model": model, "example_inputs": (torch.randn(4, 16),),
            "loss_fn": nn.functional.mse_loss, "target": torch.zeros(4, 8)}
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_py_trains_with_the_recorded_factory(tmp_path: Path) -> None:
    (tmp_path / "factory.py").write_text(FACTORY)
    _, _, plan = traced_plan("mlp", 2)
    plan.data = plan.data.model_copy(update={"factory": f"{tmp_path / 'factory.py'}:make"})
    directory = plan.save(tmp_path / "plan")
    out = io.StringIO()
    code = run_plan(directory, nproc=2, steps=3, backend="gloo", stream=out)
    log = out.getvalue()
    assert code == 0, log
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "loss " in line]
    assert len(losses) == 3 and losses[-1] < losses[0], log
    assert {"timeline_rank0.json", "timeline_rank1.json"} <= {p.name for p in directory.iterdir()}
