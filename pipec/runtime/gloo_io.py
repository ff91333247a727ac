"""Gloo's network thread must not take the core from a thread holding its connection's lock.

Phase: stage runtime, once the process groups exist (:class:`pipec.PipelineRuntime`
and the calibration benches). Gloo's TCP transport runs one event-loop thread
per device (named ``gloo_tcp_loop``) beside the rank's own thread. Posting a
send or a receive takes the connection's lock and can wake that loop thread;
the kernel then lets the woken thread preempt the poster while the poster
still holds the lock. The loop thread only *tries* the lock and, failing,
goes straight back to ``epoll_wait``, which reports the same ready socket at
once: it spins until the scheduler's next tick preempts it (seen with ``perf
sched``: ``gloo_tcp_loop`` running 2.4 ms, state R, while the rank's thread
waited to finish an ``irecv``). With a rank's threads on one core this stalls
a send or a receive for 1-5 ms, several times a step: a ping-pong of 4 KiB
messages between two ranks, 8 per step with 0.3 ms of compute between them,
took 10.3 ms a step (median) against 5.2 ms once the loop thread was
``SCHED_BATCH``.

``SCHED_BATCH`` (Linux, no privilege needed) keeps the thread's share of the
CPU but stops it preempting on wake-up: it runs when the rank's thread
blocks, sleeps or yields -- which it does to wait for the very message the
loop thread handles -- or at the next tick. One thing it did run for at once
before: the rest of a message the socket did not take in one write, which the
loop thread flushes. So the runtime yields the core once after each send
(``YIELD_AFTER_SEND``; the lock is free by then); without it, GPipe on 96 KiB
boundaries ran 4-10% slower than before, with it 3% faster. Measured by
``benchmarks/gloo_io.py`` (the runtime's step, policies alternated in one run):
1F1B on tiny blocks 0.84x, interleaved 1F1B with a long skip 0.71x, GPipe
0.97x, GPT-2 and ZB-H1 0.98-0.99x the step time before. With a spare core the
loop thread simply runs there. NCCL does not use these threads; other
platforms have no such policy and are left as they are.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

LOOP_THREADS = ("gloo_tcp_loop",)
# P2P yields the core after each Gloo send (see the module docstring): set once a loop
# thread of this process is under SCHED_BATCH, which is what the yield makes up for
YIELD_AFTER_SEND = False


def yield_core() -> None:
    """Give the core to another runnable thread (``sched_yield``; a zero sleep where the
    platform has none)."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()
    else:
        time.sleep(0)


def loop_threads() -> list[int]:
    """The thread ids of this process's Gloo TCP event-loop threads (none where there is
    no ``/proc``)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() in LOOP_THREADS:
                    out.append(int(tid))
        except (OSError, ValueError):  # the thread ended
            continue
    return out


def calm_gloo_io_threads() -> int:
    """Put this process's Gloo TCP event-loop threads under ``SCHED_BATCH``; how many
    were changed (0 where there are none, or the platform has no such policy)."""
    policy = getattr(os, "SCHED_BATCH", None)
    setter = getattr(os, "sched_setscheduler", None)
    if policy is None or setter is None:
        return 0
    changed = 0
    for tid in loop_threads():
        try:
            if os.sched_getscheduler(tid) != policy:
                setter(tid, policy, os.sched_param(0))
                changed += 1
        except OSError as err:  # the thread ended, or the policy is refused
            log.debug("Gloo thread %s left as it is: %s", tid, err)
    global YIELD_AFTER_SEND
    if changed:
        YIELD_AFTER_SEND = True
        log.debug("%d Gloo event-loop thread(s) set to SCHED_BATCH", changed)
    elif not YIELD_AFTER_SEND:
        log.info("Gloo's event-loop thread left as it is (no SCHED_BATCH here: found none or refused); "
                 "on one core per rank its sends and receives may stall for a few ms (pipec.runtime.gloo_io)")
    return changed


__all__ = ["LOOP_THREADS", "calm_gloo_io_threads", "loop_threads", "yield_core"]
