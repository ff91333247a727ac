"""Waiting for communication without hanging: a deadline on every wait, and interruption.

Phase: stage runtime. Gloo gives no way to poll a point-to-point request
(``Work.is_completed()`` stays False until ``wait()`` is called) and a
``wait(timeout)`` that expires closes every connection of the process group,
so a wait cannot be a loop of short waits. Instead every wait here is one
``work.wait(timeout)`` with the whole deadline (``timeout`` seconds), made on
the thread that computes (no hand-off, no cost), and the rank's
:class:`~pipec.runtime.failure.FailureMonitor` thread -- which polls the c10d
store every half second for published failures and heartbeats -- interrupts
it when the pipeline fails, by closing this process's connections. A rank
that fails closes its own connections, so peers blocked on it stop at once.

A wait ends in one of four ways, the last three as :class:`PeerFailure`: the
requests complete; the monitor interrupts it (the reason it found: another
rank's failure, a silent peer, a lost store); a request fails, typically
"Connection closed by peer" (the failure the dead or failing peer published,
if it appears within a second, else that peer named unreachable); or the
deadline passes (the peer not yet heard from, named).

Collectives (the tied-gradient all-reduce) run on Gloo's worker threads, so
they can be polled: :meth:`Waiter.wait_collective` polls ``is_completed()``,
yielding the core between polls for the first ``_YIELD_FOR`` seconds and then
sleeping (growing with the time waited, so the overshoot stays a small fraction
of the collective), and asks the monitor between polls. Yield, not sleep, first:
a rank's Gloo threads share its core, and with sleeps between polls a 4 KiB
all-reduce of two ranks pinned one per core took 3.8 ms instead of 0.2 ms (a
blocking wait) -- 0.16 ms with yields -- which every step paid once per
collective (the non-finite check's, the tied gradients'). The yields are
capped at 5 ms a wait: a rank that waits longer for a slower peer then sleeps
rather than keep its core busy (with Gloo's loop thread under SCHED_BATCH,
:mod:`pipec.runtime.gloo_io`, sleeping polls cost little more: 0.18 ms for that
all-reduce). With NCCL
(``inline=True``) ``work.wait()`` only makes the CUDA stream wait, without
blocking the CPU; the deadline is the process group's timeout, which NCCL's
watchdog enforces.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch.distributed as dist

from pipec.runtime.failure import FailureMonitor, FailureRecord, PeerFailure
from pipec.runtime.gloo_io import yield_core

Request = tuple[dist.Work, int]  # a request and the peer rank it waits for
_YIELD_FOR = 0.005  # seconds a collective's wait yields the core between polls before it sleeps


def _seconds(left: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(left, 0.001))


class Waiter:
    """Waits for this rank's requests with a deadline of ``timeout`` seconds per wait."""

    def __init__(
        self,
        *,
        rank: int,
        timeout: float,
        monitor: FailureMonitor | None,
        poll_interval: float = 0.05,
        inline: bool = False,
    ) -> None:
        self.rank = rank
        self.timeout = timeout
        self.monitor = monitor
        self.poll_interval = poll_interval
        self.inline = inline

    def _known_failure(self, peers: Sequence[int]) -> None:
        reason = self.monitor.check(peers) if self.monitor is not None else None
        if reason is not None:
            raise PeerFailure(reason, rank=self.rank)

    def wait(self, requests: Sequence[Request], what: str) -> None:
        """Block until every request completes; raise :class:`PeerFailure` (with no
        action or step yet: the caller knows them) when the pipeline fails."""
        if not requests:
            return
        peers = [peer for _, peer in requests]
        self._known_failure(peers)
        if self.inline:
            for work, _ in requests:
                work.wait()  # NCCL: a stream wait; the watchdog enforces the timeout
            return
        deadline = time.monotonic() + self.timeout
        if self.monitor is not None:
            self.monitor.waiting(peers)
        try:
            for work, peer in requests:
                try:
                    work.wait(_seconds(deadline - time.monotonic()))
                except Exception as error:  # Gloo raises RuntimeError, DistError, ...
                    raise PeerFailure(self._explain(peer, what, error), rank=self.rank) from error
        finally:
            if self.monitor is not None:
                self.monitor.waiting(None)

    def wait_collective(self, work: dist.Work, peers: Sequence[int], what: str) -> None:
        """Wait for a collective of ``peers`` by polling it, asking the monitor between polls.

        For the first ``_YIELD_FOR`` seconds each poll yields the core
        (``sched_yield``): Gloo's threads, which do the collective, run at once
        (see the module docstring). Then the sleep between polls is 1/16 of the
        time waited so far (0.1 ms at least, ``poll_interval`` at most), so
        completion is noticed within ~6% of the collective's duration: a doubling
        backoff overshoots by up to 100% (a 26 ms all-reduce noticed at 51 ms),
        which a step pays in full.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        while not self.inline and not work.is_completed():
            self._known_failure(peers)
            now = time.monotonic()
            if now > deadline:
                raise PeerFailure(self._timed_out(peers[0], what), rank=self.rank)
            if now - started < _YIELD_FOR:
                yield_core()
            else:
                time.sleep(min(max(1e-4, (now - started) / 16), self.poll_interval))
        try:
            if self.inline:
                work.wait()
            else:
                work.wait(_seconds(deadline - time.monotonic()))
        except Exception as error:
            raise PeerFailure(self._explain(peers[0], what, error), rank=self.rank) from error

    def poll(self, ready: Callable[[], bool], what: str, waiting_on: Sequence[int]) -> None:
        """Call ``ready`` (a quick check, e.g. of a store key) until it is True, with the
        same deadline and failure checks as :meth:`wait`."""
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                if ready():
                    return
            except PeerFailure:  # the store is gone, and who hosts it is named
                raise
            except Exception as exc:  # the store is gone
                record = FailureRecord(None, None, None, f"{what} failed with {type(exc).__name__}: {exc}",
                                       self.rank)
                raise PeerFailure(record, rank=self.rank) from exc
            self._known_failure(waiting_on)
            if time.monotonic() > deadline:
                raise PeerFailure(self._timed_out(min(waiting_on, default=0), what), rank=self.rank)
            time.sleep(delay)
            delay = min(delay * 2, self.poll_interval)

    def failure(self, peer: int, what: str, error: BaseException) -> PeerFailure:
        """The :class:`PeerFailure` to raise when ``what``, which needed ``peer``, failed with
        ``error`` outside a wait (posting a request to a closed connection, creating a process
        subgroup): the peer's published failure when it has one."""
        if isinstance(error, PeerFailure):
            return error
        return PeerFailure(self._explain(peer, what, error), rank=self.rank)

    def _explain(self, peer: int, what: str, error: BaseException) -> FailureRecord:
        """Why ``error`` ended a wait for ``peer``."""
        if self.monitor is not None and self.monitor.interrupted is not None:
            return self.monitor.interrupted
        text = " ".join(str(error).split())
        if "Timed out waiting" in text:
            return self._timed_out(peer, what)
        # a peer that failed published its failure before closing its connections;
        # a process that died did not: give a record a moment to appear
        published = self.monitor.first_failure(wait=1.0) if self.monitor is not None else None
        if published is not None:
            return published
        return FailureRecord(
            peer, None, None,
            f"rank {peer} is unreachable (its process died or closed its connections): "
            f"{what} failed with {type(error).__name__}: {text[:300]}",
            self.rank,
        )

    def _timed_out(self, peer: int, what: str) -> FailureRecord:
        if self.monitor is not None and not self.monitor.started(peer):
            return FailureRecord(
                peer, None, None,
                f"rank {peer} never started: no heartbeat from it within {self.timeout:g} s ({what}); it "
                "failed or exited before building its PipelineRuntime (see its output), or it takes "
                "longer than the timeout to start",
                self.rank,
            )
        return FailureRecord(
            peer, None, None,
            f"rank {peer} did not complete {what} within {self.timeout:g} s although it is alive "
            "(its heartbeat goes on): is it stuck outside pipe.step, or running another schedule?",
            self.rank,
        )
