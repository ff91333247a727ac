"""``pipec run``: launch a saved plan's ``run.py`` on N local processes through torchrun.

Phase: stage runtime (launcher). Input: a plan directory written by
``plan.save`` (it holds ``plan.json`` and the generated ``run.py``). It runs::

    python -m pipec.runtime.torchrun_local --nproc-per-node N --master-addr ADDR \
        --master-port 0 --tee 3 DIR/run.py --steps K [extra args]

(torchrun, with its rendezvous store listening on ADDR only:
:mod:`pipec.runtime.torchrun_local`),

streams every rank's output line by line as ``[rank<r>] ...``, and returns the
exit code. The rendezvous store listens on ``127.0.0.1`` unless ``master_addr``
says otherwise, and with a loopback address Gloo's connections use the
loopback interface too (``GLOO_SOCKET_IFNAME``, unless set). The backend reaches the ranks as ``PIPEC_BACKEND``, which the
generated ``run.py`` reads.

When a rank fails, the generated ``run.py`` prints the first failure of the
pipeline (:func:`pipec.runtime.failure.failure_line`, the same on every rank)
and every other rank stops within seconds. The launcher then gives torchrun
``settle`` seconds to end by itself, sends SIGTERM to torchrun and to every
rank's process group, and SIGKILL ``grace`` seconds later; whatever happens,
no process it started outlives it (:class:`~pipec.runtime.proctree.ProcessTree`).
It ends with the failing rank's traceback and, as its last line, the first
failure: ``pipec run: rank R failed at action A of step S: MESSAGE``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

from pipec.errors import ConfigError, PlanError
from pipec.runtime.failure import FailureRecord, parse_failure_line
from pipec.runtime.proctree import ProcessTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nodes:
    """One node of a multi-node launch: torchrun's ``--nnodes``, ``--node-rank`` and the
    c10d rendezvous ``HOST:PORT`` every node names (``--rdzv-endpoint``)."""

    nnodes: int
    node_rank: int
    endpoint: str

_PREFIX_RE = re.compile(r"^\[default(\d+)\]:(.*)$")
_ROOT_RANK_RE = re.compile(r"^\s*rank\s*:\s*(\d+)")
_SIGNAL_RE = re.compile(r"Signal \d+ \(\w+\)")
ATTEMPT_LINE_PREFIX = "PIPEC_ATTEMPT "  # run.py's local rank 0, on each restart: which attempt this is
_WORKER_FAILED_RE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")  # torchrun's agent
_TAIL_LINES = 40
_SIGNALS = {int(s) for s in signal.Signals}
_REFRESH_S = 0.5  # how often the process tree is re-read


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _plan_ranks(directory: Path) -> int | None:
    """The plan's world size: ``data_parallel x num_ranks`` (1 replica in older plans)."""
    try:
        data = json.loads((directory / "plan.json").read_text(encoding="utf-8"))
        ranks, replicas = data.get("num_ranks"), data.get("data_parallel", 1)
        return int(ranks) * int(replicas) if isinstance(ranks, int) and isinstance(replicas, int) else None
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
    nodes: Nodes | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """The command line :func:`run_plan` executes: ``nproc`` processes on this node;
    with ``nodes``, torchrun's own multi-node rendezvous (c10d at ``nodes.endpoint``)."""
    where = ["--master-addr", master_addr, "--master-port", str(master_port)] if nodes is None else [
        "--nnodes", str(nodes.nnodes), "--node-rank", str(nodes.node_rank),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", nodes.endpoint,
    ]
    return [
        sys.executable,
        "-m",
        "pipec.runtime.torchrun_local",
        "--nproc-per-node",
        str(nproc),
        *where,
        *(["--max-restarts", str(max_restarts)] if max_restarts else []),
        "--tee",
        "3",
        str(directory / "run.py"),
        "--steps",
        str(steps),
        *extra_args,
    ]


def _check_arguments(path: Path, nproc: int, backend: str | None, steps: int, nnodes: int = 1) -> None:
    if not (path / "run.py").is_file():
        raise PlanError(
            f"{path} has no run.py; expected a plan directory written by plan.save(dir) or "
            "`pipec partition ... -o DIR`"
        )
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc: expected a number of processes >= 1, found {nproc!r}")
    ranks = _plan_ranks(path)
    if ranks is not None and ranks != nproc * nnodes:
        per_node = f"{ranks // nnodes} per node" if ranks % nnodes == 0 else f"a node count that divides {ranks}"
        nodes = f" on each of {nnodes} nodes" if nnodes > 1 else ""
        raise ConfigError(
            f"the plan in {path} runs on {ranks} ranks, but nproc is {nproc}{nodes}; "
            f"pass --nproc {ranks // nnodes if ranks % nnodes == 0 else ranks} ({per_node}) or re-plan for "
            "this many ranks"
        )
    if backend not in (None, "gloo", "nccl"):
        raise ConfigError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, found {steps}")


def _read_lines(pipe: IO[str], lines: queue.Queue[str | None]) -> None:
    for raw in pipe:
        lines.put(raw.rstrip("\n"))
    lines.put(None)


class _Output:
    """What the launcher makes of torchrun's output: streamed lines, per-rank tails,
    the first failure record, torchrun's root cause."""

    def __init__(self, out: TextIO, restarts: int = 0) -> None:
        self.out = out
        self.restarts = restarts  # torchrun restarts the ranks this often: a failure is not the end
        self.failures = 0
        self.tails: dict[int, deque[str]] = {}
        self.record: FailureRecord | None = None
        self.root_rank: int | None = None
        self.signal_text: str | None = None
        self._in_root_cause = self._in_launcher_traceback = False
        self.attempt = 0  # torchrun's restart count, as the restarted ranks say (PIPEC_ATTEMPT)
        self._announced: set[int] = set()  # attempts whose failure was announced

    def feed(self, line: str) -> None:
        m = _PREFIX_RE.match(line)
        if m is not None:
            rank, text = int(m.group(1)), m.group(2)
            if text.startswith(ATTEMPT_LINE_PREFIX):  # machine-readable: kept, not shown
                self.attempt = max(self.attempt, int(text[len(ATTEMPT_LINE_PREFIX):].strip() or 0))
                return
            record = parse_failure_line(text)
            if record is not None:  # machine-readable: kept, not shown
                # with restarts the latest: what ends the run if the restarts run out
                self.record = record if self.restarts else self.record or record
                return
            self.tails.setdefault(rank, deque(maxlen=_TAIL_LINES)).append(text)
            self.out.write(f"[rank{rank}] {text}\n")
            self.out.flush()
            return
        # torchrun's own output: keep its messages, drop its launcher traceback
        failed = _WORKER_FAILED_RE.search(line)
        # the agent saw a rank end badly (a line per rank it found failed): it restarts them all
        if failed is not None and self.restarts and self.attempt not in self._announced:
            self._announced.add(self.attempt)
            self.failures += 1
            if self.failures <= self.restarts:
                code = int(failed.group(1))
                how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 and -code in _SIGNALS else \
                    f"exit code {code}"
                self.out.write(f"pipec run: local rank {failed.group(2)} ended with {how}; torchrun restarts "
                               f"every rank from the newest checkpoint (restart {self.failures} of at most "
                               f"{self.restarts})\n")
        if line.startswith("Traceback (most recent call last)"):
            self._in_launcher_traceback = True
        if "Root Cause" in line:
            self._in_root_cause = True
        if self._in_root_cause:
            rm = _ROOT_RANK_RE.match(line)
            if rm is not None and self.root_rank is None:
                self.root_rank = int(rm.group(1))
            sm = _SIGNAL_RE.search(line)
            if sm is not None and self.signal_text is None:
                self.signal_text = sm.group(0)
        if not self._in_launcher_traceback:
            self.out.write(line + "\n")
            self.out.flush()


def run_plan(
    directory: str | os.PathLike[str],
    *,
    nproc: int,
    backend: str | None = None,
    steps: int = 10,
    extra_args: Sequence[str] = (),
    master_addr: str = "127.0.0.1",
    stream: TextIO | None = None,
    settle: float = 3.0,
    grace: float = 10.0,
    nodes: Nodes | None = None,
    max_restarts: int = 0,
) -> int:
    """Run ``DIR/run.py`` on ``nproc`` local ranks; returns the exit code (0 on success).
    With ``nodes`` this is one node of several (run the same on each, with its
    ``node_rank``): ``nproc`` per node, ``nproc x nnodes`` = the plan's world.

    With ``max_restarts`` N > 0, a failed rank does not end the run: torchrun
    stops every rank and starts them again, up to N times, and the generated
    ``run.py`` resumes from the newest complete checkpoint (see its
    ``--checkpoint-every`` / ``--checkpoint-minutes``); the launcher then leaves
    the stopping to torchrun and logs each failure as a restart.

    Raises :class:`PlanError` when ``directory`` holds no ``run.py`` and
    :class:`ConfigError` when ``nproc`` differs from the plan's ranks.
    """
    out = stream if stream is not None else sys.stdout
    path = Path(directory)
    _check_arguments(path, nproc, backend, steps, nodes.nnodes if nodes is not None else 1)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"max_restarts: expected a number of restarts >= 0, found {max_restarts!r}")
    cmd = torchrun_command(  # port 0: torchrun_local binds one the kernel chooses
        path, nproc=nproc, steps=steps, master_addr=master_addr, master_port=0, extra_args=extra_args,
        nodes=nodes, max_restarts=max_restarts,
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if backend is not None:
        env["PIPEC_BACKEND"] = backend
    loopback = _loopback_interface()
    if loopback is not None and _is_loopback(master_addr):
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    log.info("launching: %s", shlex.join(cmd))
    output = _Output(out, restarts=max_restarts)
    proc = _spawn(cmd, env)
    log.info("torchrun started: pid %d", proc.pid)
    tree = ProcessTree(proc.pid)
    try:
        code = _supervise(proc, tree, output, settle=settle, grace=grace)
    finally:
        _stop(proc, tree, grace=2.0)  # nothing survives, whatever happened
    failed = code != 0 or (output.record is not None and not max_restarts)
    if failed:
        out.write(_failure_summary(code, output))
        out.flush()
        return code if code > 0 else 1
    return 0


def _spawn(cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """torchrun in a session of its own, so its process group can be signalled."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
        start_new_session=True,
    )


def _supervise(
    proc: subprocess.Popen[str], tree: ProcessTree, output: _Output, *, settle: float, grace: float
) -> int:
    """Stream until torchrun ends; after the first failure, stop it if it does not end by itself."""
    assert proc.stdout is not None  # we asked for a pipe
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    next_refresh = 0.0
    failed_at: float | None = None
    terminated_at: float | None = None
    killed = False
    while True:
        now = time.monotonic()
        if now >= next_refresh:
            tree.refresh()
            next_refresh = now + _REFRESH_S
        if failed_at is None and output.record is not None and not output.restarts:
            failed_at = now  # with restarts torchrun stops and restarts the ranks itself
        if failed_at is not None and terminated_at is None and now > failed_at + settle:
            log.info("stopping the ranks: a rank failed %.0f s ago", now - failed_at)
            tree.signal(signal.SIGTERM)
            terminated_at = now
        if terminated_at is not None and now > terminated_at + grace:
            if not killed:
                log.info("killing the ranks still alive %.0f s after SIGTERM", now - terminated_at)
                killed = True
            tree.signal(signal.SIGKILL)
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        output.feed(line)
    try:
        return proc.wait(timeout=max(grace, 1.0))
    except subprocess.TimeoutExpired:
        tree.signal(signal.SIGKILL)
        return proc.wait()


def _stop(proc: subprocess.Popen[str], tree: ProcessTree, *, grace: float) -> None:
    tree.refresh()
    if not tree.alive():
        proc.poll()
        return
    tree.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while tree.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    tree.signal(signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while tree.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.poll()


def _traceback_of(tails: dict[int, deque[str]], rank: int | None) -> list[str] | None:
    lines = list(tails.get(rank, ())) if rank is not None else []
    starts = [i for i, x in enumerate(lines) if x.startswith("Traceback")]
    return lines[starts[-1]:] if starts else None


def _failure_summary(code: int, output: _Output) -> str:
    """The failing rank's traceback, then the first failure as the last line."""
    record, tails = output.record, output.tails
    if record is not None:
        last = record.describe()
        candidates = [record.rank, record.reported_by]
    else:
        rank = output.root_rank
        if rank is None:  # the first rank whose output ends in an error
            rank = next((r for r in sorted(tails) if any("Error" in x for x in tails[r])), None)
        if rank is None:
            return f"pipec run: failed with exit code {code}; no rank reported an error\n"
        lines = list(tails.get(rank, ()))
        cause = output.signal_text or next((x.strip() for x in reversed(lines) if x.strip()), "no error message")
        last = f"rank {rank} failed (exit code {code}): {cause}"
        candidates = [rank]
    text = ""
    for rank in candidates:
        error = _traceback_of(tails, rank)
        if error is not None:
            body = "\n".join(f"  {x}" for x in error)
            text = f"pipec run: rank {rank} failed (exit code {code}):\n{body}\n"
            break
    return f"{text}pipec run: {' '.join(last.split())}\n"
