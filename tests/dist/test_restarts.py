"""``pipec run --max-restarts``: a rank killed mid-run, or while it writes a checkpoint,
and the job still finishes with the parameters of an uninterrupted run.

The factory's model (an MLP with dropout, so the seed matters) is planned on 2
ranks; a global forward pre-hook (torch's public API) on the rank named by
``PIPEC_TEST_KILL=kind:rank:step`` counts stage 0's forward calls (one per
micro-batch) and, once (a marker file), at the start of ``step``:
``kill`` SIGKILLs the rank; ``fsize`` caps its file size (``RLIMIT_FSIZE``), so
the kernel kills it (SIGXFSZ) in the middle of writing its next checkpoint.
Rank 0 is the one killed: it is not the store's host under torchrun (the agent
is), and the restarted ranks meet on the agent's store again.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from _workers import saved_factory_plan

import pipec
from pipec.runtime.checkpoint import merge_checkpoint
from pipec.runtime.launch import run_plan

FACTORY = '''
import os, resource, signal
import torch
from torch import nn

_calls = {"n": 0}


def _hook(module, args):
    if type(module).__name__ != "Stage0":
        return
    _calls["n"] += 1
    kind, rank, step = os.environ.get("PIPEC_TEST_KILL", "none:-1:-1").split(":")
    marker = os.environ.get("PIPEC_TEST_MARKER", "")
    if int(os.environ["RANK"]) != int(rank) or _calls["n"] != 4 * int(step) + 1 or os.path.exists(marker):
        return
    open(marker, "w").close()
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "fsize":  # the next write past 64 KiB (its checkpoint's model file) kills it
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def make():
    if os.environ.get("PIPEC_TEST_KILL"):
        nn.modules.module.register_module_forward_pre_hook(_hook)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Dropout(0.1), nn.Linear(128, 256), nn.Tanh(),
                          nn.Linear(256, 8))
    return {"model": model, "example_inputs": (torch.randn(8, 16),), "target": torch.zeros(8, 8),
            "loss_fn": nn.functional.mse_loss}
'''


def restart_plan(tmp_path: Path, name: str) -> Path:
    """The factory's MLP on 2 ranks (1F1B, 4 micro-batches): rank 0 holds the first two Linears."""

    def before_second_tanh(traced: Any, costs: Any) -> list[int]:
        return [[i for i, n in enumerate(traced.nodes) if n.module_path.endswith("4")][0]]

    return saved_factory_plan(tmp_path, FACTORY, name, before_second_tanh)


def _equal_checkpoints(a: Path, b: Path) -> None:
    expected = merge_checkpoint(a / "checkpoint", pipec.load(a))
    found = merge_checkpoint(b / "checkpoint", pipec.load(b))
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


def _run(directory: Path, *args: str, restarts: int = 0) -> tuple[int, str]:
    out = io.StringIO()
    code = run_plan(directory, nproc=2, backend="gloo", steps=6, stream=out, max_restarts=restarts,
                    extra_args=("--checkpoint-every", "2", *args))
    return code, out.getvalue()


@pytest.fixture()
def straight(tmp_path: Path) -> Path:
    directory = restart_plan(tmp_path, "straight")
    code, text = _run(directory)
    assert code == 0, text
    return directory


@pytest.mark.timeout(120)
def test_a_rank_killed_mid_run_restarts_and_ends_bit_identical(
    tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = restart_plan(tmp_path, "broken")
    monkeypatch.setenv("PIPEC_TEST_KILL", "kill:0:3")  # in step 3, after the checkpoint of step 2
    monkeypatch.setenv("PIPEC_TEST_MARKER", str(tmp_path / "killed"))
    code, text = _run(broken, restarts=2)
    assert code == 0, text
    assert (tmp_path / "killed").exists(), text
    # the agent may see rank 0's SIGKILL or rank 1 leave (it lost its peer) first
    assert "torchrun restarts every rank from the newest checkpoint (restart 1 of at most 2)" in text, text
    assert text.count("torchrun restarts every rank") == 1, text
    assert "resumed from the checkpoint of step 2" in text and "(restart 1)" in text, text
    assert "step 5: loss" in text, text
    _equal_checkpoints(straight, broken)


@pytest.mark.timeout(120)
def test_a_rank_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
    tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rank0 = straight / "checkpoint" / "step_00000006" / "rank0" / "model.safetensors"
    assert rank0.stat().st_size > 64 * 1024  # so the cap is hit inside the checkpoint's write
    broken = restart_plan(tmp_path, "broken")
    monkeypatch.setenv("PIPEC_TEST_KILL", "fsize:0:3")  # killed writing the checkpoint of step 4
    monkeypatch.setenv("PIPEC_TEST_MARKER", str(tmp_path / "killed"))
    code, text = _run(broken, restarts=1)
    assert code == 0, text
    assert "checkpoint of step 4 written" not in text.split("restart 1 of")[0], text
    assert "resumed from the checkpoint of step 2" in text and "(restart 1)" in text, text
    _equal_checkpoints(straight, broken)
    names = sorted(p.name for p in (broken / "checkpoint").iterdir())
    assert names[0] == "latest" and all((broken / "checkpoint" / n / "manifest.json").is_file() for n in names[1:])


@pytest.mark.timeout(120)
def test_when_the_restarts_run_out_the_run_fails_naming_the_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = restart_plan(tmp_path, "plan")
    monkeypatch.setenv("PIPEC_TEST_KILL", "kill:0:1")  # no marker: killed in every attempt
    monkeypatch.setenv("PIPEC_TEST_MARKER", "")
    code, text = _run(directory, restarts=1)
    assert code != 0, text
    assert text.count("torchrun restarts every rank") == 1, text
    assert "restart 1 of at most 1" in text, text
    assert text.strip().splitlines()[-1].startswith("pipec run: "), text
    assert "rank 0" in text.strip().splitlines()[-1], text


@pytest.mark.timeout(120)
def test_checkpoint_minutes_saves_when_the_time_has_come_on_every_rank(tmp_path: Path) -> None:
    directory = restart_plan(tmp_path, "plan")
    # 60 microseconds: due after every step; every rank follows rank 0's clock (any_rank)
    code, text = _run(directory, "--checkpoint-every", "0", "--checkpoint-minutes", "1e-6")
    assert code == 0, text
    for step in range(1, 7):
        assert f"checkpoint of step {step} written" in text, text
