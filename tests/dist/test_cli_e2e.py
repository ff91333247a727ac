"""The ``pipec`` command line end to end, as a user runs it, in fresh processes:
partition -> show -> run (two Gloo ranks through torchrun) -> show again; the
auto-planner from the command line; and user errors as one line, exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return dict(model=model, example_inputs=(torch.randn(8, 8),), loss_fn=nn.functional.mse_loss,
                target=torch.randn(8, 4))
"""


def pipec_cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipec", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def expected_first_loss(tmp_path: Path) -> float:
    """The plain (unpipelined) model's loss on the factory's batch."""
    from pipec.factory import load_factory

    made = load_factory(f"{tmp_path / 'factory.py'}:make")
    assert made.loss_fn is not None
    return float(made.loss_fn(made.model(*made.example_inputs), made.target).detach())


@pytest.mark.timeout(240)
def test_partition_show_run_show(tmp_path: Path) -> None:
    (tmp_path / "factory.py").write_text(FACTORY)
    ok(pipec_cli(tmp_path, "partition", "factory.py:make", "--stages", "2", "--microbatches", "2",
                 "--cost-model", "h100-sxm", "-o", "plan"))
    plan = tmp_path / "plan"
    for name in ("plan.json", "stage_0.py", "stage_1.py", "run.py", "report.html"):
        assert (plan / name).is_file(), name

    shown = ok(pipec_cli(tmp_path, "show", "plan"))
    assert "Sequential: 2 stages on 2 ranks, schedule 1f1b, 2 micro-batches" in shown  # the summary
    assert re.search(r"rank 0: 0F0 0F1", shown) and re.search(r"rank 1: .*1F0 1B0", shown)  # the grid
    assert 'id="measured"' not in (plan / "report.html").read_text(encoding="utf-8")

    ran = ok(pipec_cli(tmp_path, "run", "plan", "--nproc", "2", "--steps", "2", timeout=200))
    losses = {int(s): float(v) for s, v in re.findall(r"step (\d+): loss ([-+0-9.e]+)", ran)}
    assert sorted(losses) == [0, 1], ran
    assert losses[0] == pytest.approx(expected_first_loss(tmp_path), abs=2e-5)
    for rank in (0, 1):
        assert (plan / f"timeline_rank{rank}.json").is_file()

    ok(pipec_cli(tmp_path, "show", "plan"))
    assert 'id="measured"' in (plan / "report.html").read_text(encoding="utf-8")


@pytest.mark.timeout(240)
def test_auto_plan_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "factory.py").write_text(FACTORY)
    out = ok(pipec_cli(tmp_path, "partition", "factory.py:make", "--stages", "2", "--schedule", "auto",
                       "--microbatches", "auto", "--cost-model", "h100-sxm", "-o", "auto"))
    assert "auto-plan candidates" in out
    table = out[out.index("auto-plan candidates"):]
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        for m in (1, 2, 4, 8):
            assert re.search(rf"^{schedule} +{m} +1 ", table, re.MULTILINE), (schedule, m)
    assert re.search(r"^chosen: \S+ m=\d: fastest of \d+ candidates that fit", table, re.MULTILINE)
    shown = ok(pipec_cli(tmp_path, "show", "auto"))
    assert "auto-plan candidates" in shown  # read back from plan.json


@pytest.mark.timeout(240)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "factory.py").write_text(FACTORY)
    cases = {
        "missing factory": (["partition", "missing.py:make", "--stages", "2", "-o", "x"], r"missing\.py"),
        "bad memory limit": (["partition", "factory.py:make", "--stages", "2", "--memory-limit", "lots",
                              "--cost-model", "h100-sxm", "-o", "x"], r"memory_limit: cannot read 'lots'"),
        "zero stages": (["partition", "factory.py:make", "--stages", "0", "-o", "x"], r"num_stages|--stages"),
        "debug": (["--debug", "partition", "missing.py:make", "--stages", "2", "-o", "x"], None),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {name: subprocess.Popen([sys.executable, "-m", "pipec", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (args, _) in cases.items()}
    for name, proc in running.items():
        _, err = proc.communicate(timeout=120)
        pattern = cases[name][1]
        if pattern is None:  # --debug: the traceback instead of the one line
            assert proc.returncode != 0 and "Traceback (most recent call last)" in err, err
            assert "ConfigError: factory: file" in err and "missing.py" in err
            continue
        assert proc.returncode == 2, (name, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pipec: error: "), (name, err)
        assert re.search(pattern, lines[0]), (name, err)
    assert not (tmp_path / "x").exists()
