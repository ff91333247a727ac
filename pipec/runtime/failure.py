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
too, so the peers waiting for it stop at once.

Keys live under ``pipec/<n>/``, ``n`` counting the distributed runtimes this
process built, so every rank must build its runtimes in the same order (they
must anyway: building one is collective).
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store

from pipec.errors import RuntimeFailure

log = logging.getLogger(__name__)

FAILURE_LINE_PREFIX = "PIPEC_FAILURE "
_FAILURE_KEY = "failure"
_instances = itertools.count()


@dataclass(frozen=True)
class FailureRecord:
    """The failure that stops the pipeline. ``rank`` is the rank that failed or
    cannot be reached (None: the c10d store); ``reported_by`` the rank that wrote it."""

    rank: int | None
    action: str | None
    step: int | None
    message: str
    reported_by: int

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the c10d store"
        return f"{who} failed{_where(self.action, self.step)}: {self.message}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FailureRecord | None:
        """The record in ``text``, or None when it is not one."""
        try:
            raw = json.loads(text)
            rank, action, step = raw["rank"], raw["action"], raw["step"]
            if not (rank is None or isinstance(rank, int)) or not (step is None or isinstance(step, int)):
                return None
            return cls(rank, None if action is None else str(action), step, str(raw["message"]),
                       int(raw["reported_by"]))
        except (ValueError, KeyError, TypeError):
            return None


def _where(action: str | None, step: int | None) -> str:
    if action is not None:
        return f" at action {action}" + (f" of step {step}" if step is not None else "")
    return f" in step {step}" if step is not None else ""


def failure_line(record: FailureRecord) -> str:
    """The one line a rank writes to stderr for ``pipec run`` to pick up."""
    return FAILURE_LINE_PREFIX + record.to_json()


def parse_failure_line(line: str) -> FailureRecord | None:
    head, sep, body = line.partition(FAILURE_LINE_PREFIX)
    if not sep or head.strip():
        return None
    return FailureRecord.from_json(body)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def record_of(exc: BaseException, *, rank: int, step: int | None, action: str | None = None) -> FailureRecord:
    """The record ``exc`` raised on ``rank`` stands for: the first failure a
    :class:`PeerFailure` saw, else ``exc`` itself (its cause, when it wraps one)."""
    if isinstance(exc, PeerFailure):
        return exc.record
    if isinstance(exc, RuntimeFailure):
        cause = exc.__cause__
        message = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return FailureRecord(
            exc.rank if exc.rank is not None else rank,
            exc.action if exc.action is not None else action,
            exc.step if exc.step is not None else step,
            _one_line(message),
            rank,
        )
    return FailureRecord(rank, action, step, _one_line(f"{type(exc).__name__}: {exc}"), rank)


class PeerFailure(RuntimeFailure):
    """This rank stopped because another rank failed or could not be reached.

    ``rank``/``action``/``step`` say where *this* rank stopped, like any
    :class:`RuntimeFailure`; ``record`` (and ``failed_rank``, ``failed_action``,
    ``failed_step``) is the first failure, the one that stopped the pipeline.
    """

    def __init__(self, record: FailureRecord, *, rank: int, action: str | None = None,
                 step: int | None = None) -> None:
        super().__init__(f"{record.describe()}; rank {rank} stopped{_where(action, step)}",
                         rank=rank, action=action, step=step)
        self.record = record
        self.failed_rank = record.rank
        self.failed_action = record.action
        self.failed_step = record.step

    def located(self, *, action: str | None, step: int | None) -> PeerFailure:
        """The same failure, stopped at ``action`` of ``step`` on this rank. A record this
        rank made itself (a silent or lost peer) gets ``step``: the peer failed in it too."""
        rank = self.rank if self.rank is not None else -1
        record = self.record
        if record.step is None and record.reported_by == rank:
            record = replace(record, step=step)
        return PeerFailure(record, rank=rank, action=action, step=step)


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


class FailureMonitor:
    """Heartbeats and the failure record of one runtime, kept up to date by a thread.

    ``store`` is the process group's c10d store; the monitor uses its own
    prefix and, for the thread, its own connection (``store.clone()``). When it
    finds a failure another rank published -- or, while this rank waits for
    peers (:meth:`waiting`), a silent peer or a lost store -- it sets
    :attr:`interrupted` and calls :func:`break_connections`, so a wait blocked
    in this process ends at once.
    """

    def __init__(
        self,
        store: Store,
        *,
        rank: int,
        world_size: int,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 30.0,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.store = PrefixStore(f"pipec/{next(_instances)}/", store)
        try:
            self._thread_store: Store = self.store.clone()  # type: ignore[attr-defined]
        except (RuntimeError, AttributeError):  # a store without clone: share the connection
            self._thread_store = self.store
        self._peers = [r for r in range(world_size) if r != rank]
        self._keys = [f"heartbeat/{r}" for r in range(world_size)]
        for key in self._keys:  # every key exists before anyone reads them all
            self.store.add(key, 0)
        now = time.monotonic()
        self._last_value = {r: -1 for r in self._peers}
        self._last_change = {r: now for r in self._peers}
        self._closed: set[int] = set()
        self._store_ok = now
        self._store_error: str | None = None
        self._store_retry = 0.0  # monotonic time before which a failing store is left alone
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
        store = self._thread_store
        if time.monotonic() < self._store_retry:
            return
        try:
            store.add(self._keys[self.rank], 1)
            if self._seen is None and store.check([_FAILURE_KEY]):
                self._seen = FailureRecord.from_json(store.get(_FAILURE_KEY))
            values = store.multi_get(self._keys)
        except Exception as exc:  # the store is gone: check() reports it once it lasts
            self._store_error = f"{type(exc).__name__}: {_one_line(str(exc))[:200]}"
            # back off: each failed call makes c10d log a stack trace
            down = time.monotonic() - self._store_ok
            self._store_retry = time.monotonic() + min(8.0, 2 * max(self.heartbeat_interval, down))
            return
        now = time.monotonic()
        self._store_ok = now
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
        """Why this rank should stop waiting, or None: a failure record, a silent
        peer (those in ``waiting_on`` first), or a store that stopped answering."""
        if self.interrupted is not None:
            return self.interrupted
        if self._seen is not None:
            return self._seen
        now = time.monotonic()
        silent = [r for r in self._peers
                  if r not in self._closed and now - self._last_change[r] > self.heartbeat_timeout]
        if silent:
            r = min(silent, key=lambda p: (p not in waiting_on, p))
            return FailureRecord(
                r, None, None,
                f"rank {r} is unreachable: no heartbeat for {now - self._last_change[r]:.0f} s "
                f"(timeout {self.heartbeat_timeout:g} s); its process is stopped or hung, or its host is down",
                self.rank,
            )
        if now - self._store_ok > self.heartbeat_timeout:
            return FailureRecord(
                None, None, None,
                f"it has not answered for {now - self._store_ok:.0f} s ({self._store_error}); "
                "the launcher (torchrun) or the rank hosting it died",
                self.rank,
            )
        return None

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
        try:
            self.store.set(self._keys[self.rank], "-1")
        except Exception:  # the store is gone: nobody is left to tell
            return


def create_monitor(
    *, rank: int, world_size: int, heartbeat_timeout: float, heartbeat_interval: float = 0.5
) -> FailureMonitor | None:
    """A monitor on the default process group's store; None without a store."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError) as exc:
        log.warning("no c10d store (%s): failures are detected by timeouts only", exc)
        return None
    return FailureMonitor(
        store, rank=rank, world_size=world_size,
        heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
    )
