"""``run_plan``: torchrun launch, streamed output, and the failing rank's error.

The plan directory here holds a stand-in ``run.py`` (no torch import, so the
launch is cheap); the end-to-end run of a generated ``run.py`` lives in
test_runtime_models.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipec.errors import ConfigError, PlanError
from pipec.runtime.launch import run_plan

RUN_PY = """
import os, sys
rank = int(os.environ["RANK"])
steps = int(sys.argv[sys.argv.index("--steps") + 1])
print(f"rank {rank} of {os.environ['WORLD_SIZE']} steps={steps} backend={os.environ.get('PIPEC_BACKEND')}", flush=True)
if rank == int(os.environ.get("FAIL_RANK", "-1")):
    raise RuntimeError(f"rank {rank} failed at action 1B0 of step 0")
"""


def _plan_dir(tmp_path: Path) -> Path:
    (tmp_path / "plan.json").write_text(json.dumps({"num_ranks": 2}))
    (tmp_path / "run.py").write_text(RUN_PY)
    return tmp_path


@pytest.mark.timeout(120)
def test_run_plan_streams_and_names_the_failing_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _plan_dir(tmp_path)
    out = io.StringIO()
    assert run_plan(d, nproc=2, steps=3, backend="gloo", stream=out) == 0
    text = out.getvalue()
    for r in (0, 1):
        assert f"[rank{r}] rank {r} of 2 steps=3 backend=gloo" in text

    monkeypatch.setenv("FAIL_RANK", "1")
    out = io.StringIO()
    code = run_plan(d, nproc=2, steps=1, stream=out)
    text = out.getvalue()
    assert code != 0
    summary = text[text.index("pipec run: rank 1 failed"):]
    assert "RuntimeError: rank 1 failed at action 1B0 of step 0" in summary
    assert "ChildFailedError" not in text  # torchrun's own launcher traceback is dropped


def test_run_plan_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no run.py"):
        run_plan(tmp_path, nproc=2)
    d = _plan_dir(tmp_path)
    with pytest.raises(ConfigError, match="runs on 2 ranks, but nproc is 3"):
        run_plan(d, nproc=3)
    with pytest.raises(ConfigError, match="backend"):
        run_plan(d, nproc=2, backend="mpi")


@pytest.mark.timeout(240)
def test_run_plan_trains_a_saved_plan_end_to_end(tmp_path: Path) -> None:
    from _zoo_plans import zoo_model, zoo_plan

    zm = zoo_model("tied", microbatch=2, num_microbatches=4, steps=1)
    plan = zoo_plan(zm, num_ranks=2, schedule="1f1b", num_microbatches=4)
    d = plan.save(tmp_path / "plan")
    out = io.StringIO()
    code = run_plan(d, nproc=2, steps=2, backend="gloo", stream=out)
    text = out.getvalue()
    assert code == 0, text
    assert "step 1: loss" in text
    viz = pytest.importorskip("pipec.viz.report_measured")
    measured = viz.load_measured(d)
    assert measured is not None and measured.ranks == (0, 1) and measured.num_steps == 2
    names = {str(m.action) for m in measured.actions}
    assert {"0F0", "1B3", "0SEND_F0", "1RECV_F3"} <= names
