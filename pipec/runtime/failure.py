"""Telling every rank that one failed: a failure record in the c10d store, and heartbeats.

Phase: stage runtime. A rank that raises during a step writes a
:class:`FailureRecord` ``(rank, action, step, message)`` under the key
``failure`` of its runtime's prefix in the process group's store *before* it
re-raises; ``compare_set`` makes the first writer win, so every rank agrees on
the first failure. Every rank also runs a :class:`FailureMonitor` thread that,
every ``heartbeat_interval`` seconds, increments its own ``heartbeat/<rank>``
counter, reads the others' and checks for a failure record. A rank blocked
in a wait for a peer (:mod:`pipec.runtime.waiting`) is stopped with a
:class:`PeerFailure` when a record appears, when a peer's counter has not
moved for ``heartbeat_timeout`` seconds (its process is stopped or its host
is gone), or when the store itself stops answering: the monitor thread sees
it and interrupts the wait by closing this process's connections
(:func:`break_connections`). A rank that fails closes its own connections
too, so the peers waiting for it stop at once. No store operation blocks
for longer than ``heartbeat_timeout`` (:mod:`pipec.runtime.store`): a store
whose host (rank 0, or torchrun) exited or stopped is a failure like any.

Keys live under ``pipec/<n>/``, ``n`` counting the distributed runtimes this
process built, so every rank must build its runtimes in the same order (they
must anyway: building one is collective).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store

from pipec.runtime.failure_record import (
    FAILURE_LINE_PREFIX,
    FailureRecord,
    PeerFailure,
    failure_line,
    one_line,
    parse_failure_line,
    record_of,
)
from pipec.runtime.store import BoundedStore

__all__ = [
    "FAILURE_LINE_PREFIX",
    "FailureMonitor",
    "FailureRecord",
    "PeerFailure",
    "break_connections",
    "create_monitor",
    "failure_line",
    "parse_failure_line",
    "record_of",
]

log = logging.getLogger(__name__)

_FAILURE_KEY = "failure"
_instances = itertools.count()


_BREAK_TAG = 0x7FFFFFF0  # a tag no pipeline message uses


def break_connections(rank: int, world_size: int) -> None:
    """Close every Gloo connection of this process's default group.

    Gloo cannot interrupt a blocked ``wait()``, but a ``wait(timeout)`` that
    expires makes Gloo close all connections of its context: this posts a
    receive no one will send and lets it expire after 1 ms. A wait blocked in
    this process then fails at once, and so do the peers' waits for this
    process ("Connection closed by peer"). Only for a pipeline that failed.
    """
    if world_size < 2 or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    try:
        work = dist.irecv(torch.empty(1), src=(rank + 1) % world_size, tag=_BREAK_TAG)
        if work is not None:
            work.wait(datetime.timedelta(milliseconds=1))
    except Exception:  # expected: the expiry, or connections already closed
        return


def _tick(ref: weakref.ReferenceType[FailureMonitor]) -> bool:
    monitor = ref()
    if monitor is None or monitor._stop.is_set():
        return False
    monitor._poll_store()
    monitor._interrupt_if_needed()
    return True


def _monitor_loop(ref: weakref.ReferenceType[FailureMonitor], stop: threading.Event, interval: float) -> None:
    while _tick(ref) and not stop.wait(interval):
        pass


def _read_store(store: Store, *, own: str, keys: list[str], failure: bool) -> tuple[bytes | None, list[bytes]]:
    """One heartbeat, on the store's worker thread: count ``own`` up, then read the
    failure record (when ``failure``) and every rank's counter."""
    store.add(own, 1)
    record = store.get(_FAILURE_KEY) if failure and store.check([_FAILURE_KEY]) else None
    return record, store.multi_get(keys)


class FailureMonitor:
    """Heartbeats and the failure record of one runtime, kept up to date by a thread.

    ``store`` is the process group's c10d store; the monitor uses its own
    prefix and two connections, each a :class:`~pipec.runtime.store.BoundedStore`
    (no operation outlasts ``store_timeout`` seconds, default
    ``heartbeat_timeout``): :attr:`store` for this rank's calls and a clone for
    the thread, which never blocks on the store longer than
    ``heartbeat_interval``, so a store that stops answering cannot stop it
    either. When it finds a failure another rank published -- or, while this
    rank waits for peers (:meth:`waiting`), a silent peer or a lost store -- it
    sets :attr:`interrupted` and calls :func:`break_connections`, so a wait
    blocked in this process ends at once.

    Raises :class:`PeerFailure` when the store cannot be reached (its host,
    rank 0 unless torchrun hosts it, exited or is stopped).
    """

    def __init__(
        self,
        store: Store,
        *,
        rank: int,
        world_size: int,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 30.0,
        store_timeout: float | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        limit = heartbeat_timeout if store_timeout is None else store_timeout
        # torchrun's store outlives a restart of the ranks (--max-restarts): keys of the attempt
        # before (its failure record, its heartbeats) must not be read as this one's
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = BoundedStore(PrefixStore(f"pipec/{attempt}/{next(_instances)}/", store), rank=rank,
                                  timeout=limit)
        self._keys = [f"heartbeat/{r}" for r in range(world_size)]
        # every key exists before anyone reads them all, and this rank's first heartbeat is
        # in before the constructor returns (peers then know it started); on the existing
        # connection, so a store whose host exited fails here at once (a new one would retry)
        for r, key in enumerate(self._keys):
            self.store.add(key, 1 if r == rank else 0)
        try:
            self._thread_store = self.store.clone()
        except PeerFailure:
            raise
        except (RuntimeError, AttributeError):  # a store without clone: share the connection
            self._thread_store = self.store
        self._peers = [r for r in range(world_size) if r != rank]
        now = time.monotonic()
        self._last_value = {r: -1 for r in self._peers}
        self._last_change = {r: now for r in self._peers}
        self._closed: set[int] = set()
        self._store_ok = now
        self._store_error: str | None = None
        self._store_retry = 0.0  # monotonic time before which a failing store is left alone
        self._poll: Future[tuple[bytes | None, list[bytes]]] | None = None
        self._poll_started = now
        self._seen: FailureRecord | None = None
        self._waiting_on: tuple[int, ...] | None = None
        self.interrupted: FailureRecord | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_monitor_loop, args=(weakref.ref(self), self._stop, heartbeat_interval),
            name=f"pipec-monitor-rank{rank}", daemon=True,
        )
        self._thread.start()

    def _poll_store(self) -> None:
        """Start a heartbeat on the thread store's worker, and take its answer if it comes
        within ``heartbeat_interval``; one that does not is taken at a later tick."""
        if self._poll is None:
            if time.monotonic() < self._store_retry:
                return
            self._poll = self._thread_store.submit(partial(
                _read_store, own=self._keys[self.rank], keys=self._keys, failure=self._seen is None))
            self._poll_started = time.monotonic()
        try:
            record, values = self._poll.result(timeout=self.heartbeat_interval)
        except FutureTimeout:  # the store is slow, or stopped: check() reports it once it lasts
            self._store_error = f"a heartbeat has waited {time.monotonic() - self._poll_started:.0f} s for an answer"
            return
        except Exception as exc:  # the store is gone: check() reports it once it lasts
            self._poll = None
            self._store_error = f"{type(exc).__name__}: {one_line(str(exc))[:200]}"
            # back off: each failed call makes c10d log a stack trace
            down = time.monotonic() - self._store_ok
            self._store_retry = time.monotonic() + min(8.0, 2 * max(self.heartbeat_interval, down))
            return
        self._poll = None
        now = time.monotonic()
        self._store_ok = now
        if record is not None and self._seen is None:
            self._seen = FailureRecord.from_json(record)
        for r in self._peers:
            value = int(values[r])
            if value < 0:
                self._closed.add(r)
            elif value != self._last_value[r]:
                self._last_value[r], self._last_change[r] = value, now

    def _interrupt_if_needed(self) -> None:
        if self.interrupted is not None:
            return
        seen = self._seen
        if seen is not None and seen.reported_by != self.rank:
            reason: FailureRecord | None = seen  # another rank failed: stop whatever this rank does
        elif self._waiting_on is not None:
            reason = self.check(self._waiting_on)
        else:
            return
        if reason is not None:
            self.interrupted = reason
            break_connections(self.rank, self.world_size)

    def waiting(self, peers: Sequence[int] | None) -> None:
        """Tell the monitor that this rank now waits for ``peers`` (None: no longer)."""
        self._waiting_on = None if peers is None else tuple(peers)

    def check(self, waiting_on: Sequence[int] = ()) -> FailureRecord | None:
        """Why this rank should stop waiting, or None: a failure record, a store that
        stopped answering, or a silent peer (those in ``waiting_on`` first)."""
        if self.interrupted is not None:
            return self.interrupted
        if self._seen is not None:
            return self._seen
        if self.store.lost is not None:  # one of this rank's own calls found it gone
            return self.store.lost
        now = time.monotonic()
        if now - self._store_ok > self.heartbeat_timeout:
            # lost for this rank's calls too: publishing the failure then does not wait again
            return self.store.mark_lost(
                f"has not answered for {now - self._store_ok:.0f} s ({self._store_error or 'no answer'})")
        # silence is measured while the store answered (without it no heartbeat can be read),
        # and only of peers that started: one still loading its plan is not silent, and one
        # that never starts is found by the wait's own timeout (Waiter names it)
        silent = [r for r in self._peers
                  if r not in self._closed and self.started(r)
                  and self._store_ok - self._last_change[r] > self.heartbeat_timeout]
        if silent:
            r = min(silent, key=lambda p: (p not in waiting_on, p))
            return FailureRecord(
                r, None, None,
                f"rank {r} is unreachable: no heartbeat for {self._store_ok - self._last_change[r]:.0f} s "
                f"(timeout {self.heartbeat_timeout:g} s); its process is stopped, hung or exited, or its host is down",
                self.rank,
            )
        return None

    def started(self, peer: int) -> bool:
        """Whether ``peer``'s monitor has sent a heartbeat yet (its counter is created at 0)."""
        return peer in self._closed or self._last_value.get(peer, 1) > 0

    def report(self, record: FailureRecord) -> FailureRecord:
        """Publish ``record`` unless a failure was published first; returns the first."""
        try:
            first = self.store.compare_set(_FAILURE_KEY, "", record.to_json())
        except Exception as exc:  # the store is gone; peers find out by other means
            log.warning("rank %d could not publish its failure: %s", self.rank, exc)
            return record
        stored = FailureRecord.from_json(first)
        return stored if stored is not None else record

    def first_failure(self, wait: float = 0.0) -> FailureRecord | None:
        """The published failure, asked of the store now, or within ``wait`` seconds
        (None if none, or if the store cannot be reached)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.store.check([_FAILURE_KEY]):
                    return FailureRecord.from_json(self.store.get(_FAILURE_KEY))
            except Exception:  # the store is gone: nothing to learn from it
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def break_connections(self) -> None:
        break_connections(self.rank, self.world_size)

    def close(self) -> None:
        """Stop the thread and tell the peers this rank is done (not silent)."""
        self._stop.set()
        with contextlib.suppress(Exception):  # a lost store: nobody is left to tell
            self.store.set(self._keys[self.rank], "-1")
        self._thread_store.close()
        self.store.close()


def create_monitor(
    *,
    rank: int,
    world_size: int,
    heartbeat_timeout: float,
    heartbeat_interval: float = 0.5,
    store_timeout: float | None = None,
) -> FailureMonitor | None:
    """A monitor on the default process group's store; None without a store.
    Raises :class:`PeerFailure` when the store's host is gone."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError) as exc:
        log.warning("no c10d store (%s): failures are detected by timeouts only", exc)
        return None
    return FailureMonitor(
        store, rank=rank, world_size=world_size, heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout, store_timeout=store_timeout,
    )
