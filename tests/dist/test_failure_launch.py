"""``pipec run`` when a rank fails: every rank stopped, the first failure last, no process left.

A saved 2-stage plan whose factory's loss function (called on rank 1, the last
stage) misbehaves at a chosen step, as the environment says
(``PIPEC_TEST_FAULT=kind:rank:step``); each rank writes its PID where
``PIPEC_TEST_PIDS`` says, so the test can check that none survives.
"""

from __future__ import annotations

import io
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from _workers import saved_factory_plan

from pipec.cli import build_parser
from pipec.runtime import launch
from pipec.runtime.launch import run_plan

FACTORY = '''
import os, signal, time
import torch
from torch import nn

NUM_MICROBATCHES = 4
_calls = {"n": 0}


def loss_fn(out, target):
    step = _calls["n"] // NUM_MICROBATCHES
    _calls["n"] += 1
    kind, rank, at = (os.environ.get("PIPEC_TEST_FAULT") or "none:-1:-1").split(":")
    if int(os.environ["RANK"]) == int(rank) and step == int(at):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":  # and deaf to SIGTERM: only SIGKILL stops it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(3600)
    return nn.functional.mse_loss(out, target)


def make():
    pids = os.environ.get("PIPEC_TEST_PIDS")
    if pids:
        with open(os.path.join(pids, "rank" + os.environ["RANK"] + ".pid"), "w") as f:
            f.write(str(os.getpid()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 8))
    return {"model": model, "example_inputs": (torch.randn(8, 16),), "loss_fn": loss_fn,
            "target": torch.zeros(8, 8)}
'''


def saved_plan(tmp_path: Path, name: str = "plan") -> Path:
    """The factory's model on 2 ranks (1F1B, 4 micro-batches), split by equal node counts, saved with its factory."""

    def equal_counts(traced: Any, costs: Any) -> list[int]:
        from pipec.partitioner.baselines import equal_count
        from pipec.partitioner.graph import build_chain

        chain = build_chain(traced, costs, num_stages=2, num_ranks=2, schedule="1f1b", num_microbatches=4)
        return list(equal_count(chain.problem)[1:-1])

    return saved_factory_plan(tmp_path, FACTORY, name, equal_counts)


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"


def run_with_pids(directory: Path, pids: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                  **kwargs: object) -> tuple[int, str, list[int]]:
    """run_plan, then the PIDs of torchrun (as run_plan logs it) and of every rank it
    started (as each rank writes it): all must be gone."""
    pids.mkdir(exist_ok=True)
    monkeypatch.setenv("PIPEC_TEST_PIDS", str(pids))
    caplog.set_level(logging.INFO, logger=launch.__name__)
    out = io.StringIO()
    code = run_plan(directory, nproc=2, backend="gloo", stream=out, **kwargs)  # type: ignore[arg-type]
    started = [int(m.group(1)) for r in caplog.records
               if (m := re.fullmatch(r"torchrun started: pid (\d+)", r.getMessage()))]
    ranks = [int(p.read_text()) for p in sorted(pids.glob("rank*.pid"))]
    for p in pids.glob("rank*.pid"):
        p.unlink()
    return code, out.getvalue(), started + ranks


@pytest.mark.timeout(120)
def test_a_hung_rank_that_ignores_sigterm_is_killed_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    directory = saved_plan(tmp_path)
    monkeypatch.setenv("PIPEC_TEST_FAULT", "hang:1:2")
    monkeypatch.setenv("PIPEC_TIMEOUT", "3")
    code, text, pids = run_with_pids(directory, tmp_path / "pids", monkeypatch, caplog, steps=5, settle=1.0,
                                     grace=2.0)
    # pipec's launcher stops the ranks itself (torchrun alone would wait 30 s between its
    # SIGTERM and its SIGKILL): it says so, SIGTERM first, SIGKILL after the grace
    said = [r.getMessage() for r in caplog.records if r.name == launch.__name__]
    assert [" ".join(m.split()[:3]) for m in said if m.startswith(("stopping", "killing"))] == [
        "stopping the ranks:", "killing the ranks"], said
    assert code != 0, text
    assert len(pids) == 3, (pids, text)  # torchrun and two ranks
    assert not [p for p in pids if _alive(p)], text
    last = text.strip().splitlines()[-1]
    assert last.startswith("pipec run: rank 1 failed in step 2: rank 1 did not complete"), text
    assert "within 3 s" in last


LISTENERS_PY = """
import os
port = int(os.environ["MASTER_PORT"])
found = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        local, state = row.split()[1], row.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            found.append(local.rsplit(":", 1)[0])
print("listening on", sorted(found), "gloo", os.environ.get("GLOO_SOCKET_IFNAME"), flush=True)
"""


@pytest.mark.timeout(120)
def test_the_rendezvous_listens_on_localhost_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "plan.json").write_text('{"num_ranks": 2}')
    (tmp_path / "run.py").write_text(LISTENERS_PY)
    caplog.set_level(logging.INFO, logger=launch.__name__)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    out = io.StringIO()
    assert run_plan(tmp_path, nproc=2, stream=out) == 0, out.getvalue()
    # the store's socket, as the kernel sees it: 127.0.0.1 (0100007F), not every interface
    assert "[rank0] listening on ['0100007F'] gloo lo" in out.getvalue(), out.getvalue()
    launched = [r.getMessage().removeprefix("launching: ") for r in caplog.records
                if r.getMessage().startswith("launching: ")]
    assert len(launched) == 1, launched
    command = shlex.split(launched[0])
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"
    assert command[1:3] == ["-m", "pipec.runtime.torchrun_local"]
    assert build_parser().parse_args(["run", str(tmp_path), "--nproc", "2"]).master_addr == "127.0.0.1"
