"""Ranks never outlive their launcher: SIGKILL ``pipec run`` (or torchrun under it) and
every rank is gone within seconds (:mod:`pipec.runtime.parent_death`).

``pipec run`` trains the restart tests' plan for many steps; each rank writes its
PID (``PIPEC_TEST_PIDS``, read by the factory of test_failure_launch's kind) and
the test waits for the first loss line, kills the launcher with SIGKILL -- no
handler runs, no cleanup of its own -- and waits (bounded, polled) for every
rank to be gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_failure_launch import _alive
from test_restarts import restart_plan

PID_FACTORY_LINE = "def make():\n"
PIDS = '''def make():
    pids = os.environ.get("PIPEC_TEST_PIDS")
    if pids:
        with open(os.path.join(pids, "rank" + os.environ["RANK"] + ".pid"), "w") as f:
            f.write(str(os.getpid()))
'''


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], limit: float) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and [p for p in pids if _alive(p)]:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["pipec run", "torchrun"])
def test_killing_the_launcher_takes_every_rank_with_it(tmp_path: Path, victim: str) -> None:
    directory = restart_plan(tmp_path, "plan")
    factory = tmp_path / "factory.py"
    factory.write_text(factory.read_text().replace(PID_FACTORY_LINE, PIDS, 1))
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, PIPEC_TEST_PIDS=str(pids), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipec", "run", str(directory), "--nproc", "2", "--steps", "100000",
         "--backend", "gloo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:  # training has started on every rank
            if "step 1: loss" in line:
                break
        ranks = [int(p.read_text()) for p in sorted(pids.glob("rank*.pid"))]
        torchrun = _children(launcher.pid)
        assert len(ranks) == 2 and len(torchrun) == 1, (ranks, torchrun)
        target = launcher.pid if victim == "pipec run" else torchrun[0]
        os.kill(target, signal.SIGKILL)
        survivors = _wait_gone(ranks + torchrun, 20.0)
        assert not survivors, f"{survivors} outlived {victim}"
    finally:
        for p in [launcher.pid, *_children(launcher.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        launcher.wait(timeout=10)
