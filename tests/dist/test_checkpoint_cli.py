"""``pipec run --checkpoint-every K`` and ``--resume``: a run killed mid-step resumes bit-identically.

The plan of test_failure_launch (a dropout MLP, so the RNG state matters) is
trained for 6 steps with a checkpoint every 3, twice: straight through, and
with rank 1 SIGKILLed in the middle of step 4, after which ``pipec run
--resume`` finishes the run in new processes. Both final checkpoints merge
into the same full state dict, equal tensor by tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_failure_launch import _alive, run_with_pids, saved_plan

import pipec
from pipec.cli import main
from pipec.runtime.checkpoint import merge_checkpoint
from pipec.runtime.launch import run_plan

EVERY = ("--checkpoint-every", "3")


@pytest.mark.timeout(180)
def test_pipec_run_resumes_bit_identically_after_a_rank_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    straight = saved_plan(tmp_path, "straight")
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    assert run_plan(straight, nproc=2, steps=6, backend="gloo", extra_args=EVERY) == 0
    capsys.readouterr()

    monkeypatch.setenv("PIPEC_TEST_FAULT", "kill:1:4")
    code, text, pids = run_with_pids(broken, tmp_path / "pids", monkeypatch, caplog, steps=6, extra_args=EVERY)
    assert code != 0, text
    assert len(pids) == 3 and not [p for p in pids if _alive(p)], text
    assert text.strip().splitlines()[-1].startswith("pipec run: rank 1 failed"), text
    assert (broken / "checkpoint" / "latest").read_text().strip() == "step_00000003"

    monkeypatch.delenv("PIPEC_TEST_FAULT")
    capsys.readouterr()
    assert main(["run", str(broken), "--nproc", "2", "--steps", "6", "--checkpoint-every", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from the checkpoint of step 3" in out, out
    assert "step 3: loss" in out and "step 2: loss" not in out, out

    expected = merge_checkpoint(straight / "checkpoint", pipec.load(straight))
    found = merge_checkpoint(broken / "checkpoint", pipec.load(broken))
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert torch.equal(found[name], value), name
    assert sorted(p.name for p in (broken / "checkpoint").iterdir()) == ["latest", "step_00000003", "step_00000006"]
