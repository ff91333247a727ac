"""The processes a launch started, remembered so that none outlives it.

Phase: stage runtime (launcher). torchrun starts each rank in a session of
its own, so signalling torchrun's process group does not reach the ranks, and
a rank whose torchrun died is re-parented and lost to ``ps --ppid``.
:class:`ProcessTree` therefore records every descendant of the launched
process while it runs (from ``/proc``, Linux), each with its start time so a
recycled PID is never signalled, and signals them all -- each one's whole
process group when it leads one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of ``pid``, or None if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[19]), fields[0]


class ProcessTree:
    """``root`` and every descendant seen by :meth:`refresh`."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.known: dict[int, int] = {}  # pid -> start time
        stat = _stat(root)
        if stat is not None:
            self.known[root] = stat[1]

    def refresh(self) -> None:
        """Record the descendants of the processes known so far."""
        if not _PROC.is_dir():
            return
        children: dict[int, list[tuple[int, int]]] = {}
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat is not None:
                    children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
        stack = [p for p in self.known if self._alive(p)]
        while stack:
            for pid, start in children.get(stack.pop(), ()):
                if pid not in self.known:
                    self.known[pid] = start
                    stack.append(pid)

    def _alive(self, pid: int) -> bool:
        stat = _stat(pid)
        return stat is not None and stat[1] == self.known[pid] and stat[2] != "Z"

    def alive(self) -> list[int]:
        """The known processes still running (not exited, not zombies)."""
        return [p for p in self.known if self._alive(p)]

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every known live process, and to the group of each group leader."""
        for pid in self.alive():
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
