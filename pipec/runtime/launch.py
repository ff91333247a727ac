"""``pipec run``: launch a saved plan's ``run.py`` on N local processes through torchrun.

Phase: stage runtime (launcher). Input: a plan directory written by
``plan.save`` (it holds ``plan.json`` and the generated ``run.py``). It runs::

    python -m torch.distributed.run --nproc-per-node N --master-addr ADDR \
        --master-port <free> --tee 3 DIR/run.py --steps K [extra args]

streams every rank's output line by line as ``[rank<r>] ...``, and returns the
exit code. When a rank fails it ends with a summary naming the failing rank
and its error (the last lines of that rank's traceback) instead of torchrun's
own launcher traceback. The backend reaches the ranks as ``PIPEC_BACKEND``,
which :class:`~pipec.runtime.runtime.PipelineRuntime` reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pipec.errors import ConfigError, PlanError

log = logging.getLogger(__name__)

_PREFIX_RE = re.compile(r"^\[default(\d+)\]:(.*)$")
_ROOT_RANK_RE = re.compile(r"^\s*rank\s*:\s*(\d+)")
_TAIL_LINES = 40


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def _plan_ranks(directory: Path) -> int | None:
    try:
        data = json.loads((directory / "plan.json").read_text(encoding="utf-8"))
        ranks = data.get("num_ranks")
        return int(ranks) if isinstance(ranks, int) else None
    except (OSError, ValueError):
        return None


def torchrun_command(
    directory: Path,
    *,
    nproc: int,
    steps: int,
    master_addr: str,
    master_port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line :func:`run_plan` executes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        master_addr,
        "--master-port",
        str(master_port),
        "--tee",
        "3",
        str(directory / "run.py"),
        "--steps",
        str(steps),
        *extra_args,
    ]


def run_plan(
    directory: str | os.PathLike[str],
    *,
    nproc: int,
    backend: str | None = None,
    steps: int = 10,
    extra_args: Sequence[str] = (),
    master_addr: str = "127.0.0.1",
    stream: TextIO | None = None,
) -> int:
    """Run ``DIR/run.py`` on ``nproc`` local ranks; returns the exit code (0 on success).

    Raises :class:`PlanError` when ``directory`` holds no ``run.py`` and
    :class:`ConfigError` when ``nproc`` differs from the plan's ranks.
    """
    out = stream if stream is not None else sys.stdout
    path = Path(directory)
    if not (path / "run.py").is_file():
        raise PlanError(
            f"{path} has no run.py; expected a plan directory written by plan.save(dir) or "
            "`pipec partition ... -o DIR`"
        )
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc: expected a number of processes >= 1, found {nproc!r}")
    ranks = _plan_ranks(path)
    if ranks is not None and ranks != nproc:
        raise ConfigError(
            f"the plan in {path} runs on {ranks} ranks, but nproc is {nproc}; pass --nproc {ranks} "
            "or re-plan for this many ranks"
        )
    if backend not in (None, "gloo", "nccl"):
        raise ConfigError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, found {steps}")
    cmd = torchrun_command(
        path,
        nproc=nproc,
        steps=steps,
        master_addr=master_addr,
        master_port=_free_port(master_addr),
        extra_args=extra_args,
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if backend is not None:
        env["PIPEC_BACKEND"] = backend
    log.info("launching: %s", " ".join(cmd))
    tails: dict[int, deque[str]] = {}
    root_rank: int | None = None
    in_root_cause = in_launcher_traceback = False
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None  # we asked for a pipe
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            m = _PREFIX_RE.match(line)
            if m is not None:
                rank = int(m.group(1))
                tails.setdefault(rank, deque(maxlen=_TAIL_LINES)).append(m.group(2))
                out.write(f"[rank{rank}] {m.group(2)}\n")
                out.flush()
                continue
            # torchrun's own output: keep its messages, drop its launcher traceback
            if line.startswith("Traceback (most recent call last)"):
                in_launcher_traceback = True
            if "Root Cause" in line:
                in_root_cause = True
            if in_root_cause and root_rank is None:
                rm = _ROOT_RANK_RE.match(line)
                if rm is not None:
                    root_rank = int(rm.group(1))
            if not in_launcher_traceback:
                out.write(line + "\n")
                out.flush()
        code = proc.wait()
    if code != 0:
        out.write(_failure_summary(code, root_rank, tails))
        out.flush()
    return code


def _failure_summary(code: int, root_rank: int | None, tails: dict[int, deque[str]]) -> str:
    rank = root_rank
    if rank is None:  # fall back to the first rank whose output ends in an error
        rank = next((r for r in sorted(tails) if any("Error" in x for x in tails[r])), None)
    if rank is None:
        return f"pipec run: failed with exit code {code}; no rank reported an error\n"
    lines = list(tails.get(rank, ()))
    start = max((i for i, x in enumerate(lines) if x.startswith("Traceback")), default=0)
    error = lines[start:] or ["(no output)"]
    body = "\n".join(f"  {x}" for x in error)
    return f"pipec run: rank {rank} failed (exit code {code}):\n{body}\n"
