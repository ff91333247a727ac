"""Two torchrun "nodes" on this machine train DP2 x PP2 through the generated run.py (issue #15).

Each node is one ``torchrun --nnodes 2 --node-rank R --nproc-per-node 2
--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`` process -- the command the
README gives for two real nodes -- against one c10d rendezvous, so the plan's
4 processes (2 replicas x 2 pipeline ranks) come from two launchers. Both
replicas' last-stage ranks print the same global loss every step.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MLP
from torch.nn import functional as F

import pipec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_two_torchrun_nodes_train_dp2_pp2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plan = pipec.partition(MLP(), (torch.randn(8, 16),), num_stages=2, num_microbatches=2, loss_fn=F.mse_loss,
                           target=torch.randn(8, 8), cost_model="cpu", data_parallel=2)
    directory = plan.save(tmp_path / "plan")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(Path(pipec.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
             "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "pipec-test", str(Path(directory) / "run.py"), "--steps", "3",
             "--timelines", str(tmp_path / f"timelines{r}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for p in nodes:
            out, _ = p.communicate(timeout=80)
            outputs.append(out)
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for r, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {r} exited with {p.returncode}:\n{out[-4000:]}"
    losses = [re.findall(r"step (\d+): loss ([0-9.]+)", out) for out in outputs]
    assert all(len(x) == 3 for x in losses), outputs  # one last-stage rank per node prints each step
    assert losses[0] == losses[1]  # the global mean, the same on both replicas
    assert float(losses[0][-1][1]) < float(losses[0][0][1])  # it trains
