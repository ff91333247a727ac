"""Ranks never outlive their launcher: this process dies with its parent.

Phase: stage runtime (launcher). A process whose parent is SIGKILLed is
re-parented and keeps running: a rank whose torchrun (or ``pipec run``) was
killed would hold its GPU, its port and its part of a checkpoint until someone
finds it. :func:`die_with_parent` asks the kernel to send this process
``SIGKILL`` when its parent exits (``prctl(PR_SET_PDEATHSIG)`` on Linux,
through ctypes); elsewhere a daemon thread polls the parent's pid every
``interval`` seconds and kills this process when it changes. ``pipec run``
calls it in torchrun (:mod:`pipec.runtime.torchrun_local`) and
:class:`~pipec.PipelineRuntime` in every rank started by torchrun, so killing
either launcher takes every rank with it.

Linux sends the signal when the *thread* that forked this process exits;
torchrun and ``pipec run`` start their children from their main thread, which
lives as long as they do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_armed: int | None = None  # the parent pid this process is armed against


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    log.error("the launcher (pid %d) is gone: this process stops", parent)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(interval: float = 0.5) -> str:
    """Make this process die (SIGKILL) when its parent does; returns how ("prctl" or
    "watchdog", or "orphan" when the parent was already gone -- then it is killed now).
    Calling it again in the same process (and under the same parent) does nothing more."""
    global _armed
    parent = os.getppid()
    if _armed == parent:
        return "prctl" if sys.platform.startswith("linux") else "watchdog"
    how = "prctl" if _prctl_pdeathsig(signal.SIGKILL) else "watchdog"
    # the parent may have died before prctl took effect: then nobody would signal us
    if os.getppid() != parent:
        log.error("the launcher is gone before this process started: it stops")
        os.kill(os.getpid(), signal.SIGKILL)
        return "orphan"
    if how == "watchdog":
        threading.Thread(target=_watch, args=(parent, interval), name="pipec-parent-watchdog", daemon=True).start()
    _armed = parent
    return how


__all__ = ["die_with_parent"]
