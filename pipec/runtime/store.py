"""The c10d store, with a deadline on every operation.

Phase: stage runtime. A TCPStore client blocks without limit on a server that
stopped answering (its process is stopped, its host is gone) -- its own
timeout bounds only waits for a missing key and connecting -- and connecting
to a server that exited (``clone()``) retries for the process group's
timeout, 30 minutes by default. The runtime therefore never calls the store
on its own threads: :class:`BoundedStore` runs each operation on one daemon
worker thread per connection and waits for it at most ``timeout`` seconds.
An operation that does not answer in time, or a connection the server
closed, marks the store lost: this and every later operation raise a
:class:`~pipec.runtime.failure.PeerFailure` saying who hosts the store
(rank 0, or the launcher under torchrun) and what went wrong, at once. A
worker left blocked in the store is a daemon thread: it never keeps the
process alive.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from pipec.runtime.failure_record import FailureRecord, PeerFailure

T = TypeVar("T")

_Job = tuple[Callable[[Store], object], "Future[object]"]


@dataclass(frozen=True)
class StoreHost:
    """Who serves the c10d store: ``rank`` (None: not a rank, e.g. torchrun's agent)
    and how to name it in a message."""

    rank: int | None
    where: str  # "hosted by rank 0 at 127.0.0.1:29500"

    def lost(self, *, reported_by: int, detail: str) -> FailureRecord:
        """The failure of a store that stopped answering, as ``reported_by`` saw it."""
        if self.rank is not None:
            message = (f"rank {self.rank} is unreachable: the c10d store {self.where} {detail}; "
                       f"rank {self.rank} exited (e.g. it failed), was stopped, or its host is down")
        else:
            message = (f"the c10d store {self.where} {detail}; the launcher (torchrun) "
                       "exited, or its host is down")
        return FailureRecord(self.rank, None, None, message, reported_by)


def _bottom(store: Store) -> Store:
    seen = 0
    while isinstance(store, PrefixStore) and seen < 16:  # prefix stores wrap the real one
        store = store.underlying_store
        seen += 1
    return store


def store_host(store: Store) -> StoreHost:
    """Who serves ``store``: torchrun's agent when it hosts the store, else rank 0 for a
    TCPStore (``init_process_group`` starts the server on rank 0); a file or in-memory
    store has no server (None)."""
    bottom = _bottom(store)
    if not isinstance(bottom, TCPStore):
        return StoreHost(None, f"({type(bottom).__name__})")
    address = f"{bottom.host}:{bottom.port}"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return StoreHost(None, f"hosted by the launcher (torchrun) at {address}")
    return StoreHost(0, f"hosted by rank 0 at {address}")


def _work(jobs: queue.SimpleQueue[_Job | None], store: Store) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, future = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(store))
        except BaseException as exc:  # handed to the caller, who may have given up on it
            future.set_exception(exc)


class BoundedStore:
    """``store`` (a c10d store) whose operations each end within ``timeout`` seconds.

    The methods used by the runtime (``set``, ``get``, ``add``, ``check``,
    ``compare_set``, ``multi_get``) have the c10d signatures; :meth:`call` runs
    any function of the store. Every failure is a :class:`PeerFailure` of
    ``rank`` that names the store's host; the first one marks the store lost.
    """

    def __init__(self, store: Store, *, rank: int, timeout: float, host: StoreHost | None = None) -> None:
        self.raw = store
        self.rank = rank
        self.timeout = timeout
        self.host = host if host is not None else store_host(store)
        self.lost: FailureRecord | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        # a store dropped without close() lets its worker end too (the worker holds no
        # reference to this object, only to the queue and the raw store)
        weakref.finalize(self, self._jobs.put, None)

    def submit(self, fn: Callable[[Store], T]) -> Future[T]:
        """Run ``fn(store)`` on the worker thread; its result (or exception) when done."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("this connection to the c10d store is closed"))
                return future
            if self._worker is None:
                self._worker = threading.Thread(target=_work, args=(self._jobs, self.raw),
                                                name=f"pipec-store-rank{self.rank}", daemon=True)
                self._worker.start()
            self._jobs.put((fn, future))  # type: ignore[arg-type]
        return future

    def call(self, fn: Callable[[Store], T], what: str, timeout: float | None = None) -> T:
        """``fn(store)``, or a :class:`PeerFailure` when it fails or takes longer than
        ``timeout`` (default: the store's) seconds; ``what`` names it in the message."""
        if self.lost is not None:
            raise PeerFailure(self.lost, rank=self.rank)
        limit = self.timeout if timeout is None else timeout
        future = self.submit(fn)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            future.cancel()
            self._lose(f"did not answer {what} within {limit:g} s")
            raise PeerFailure(self.lost_record(), rank=self.rank) from None
        except dist.DistNetworkError as exc:  # the server closed the connection: for good
            self._lose(f"closed the connection ({what} failed with {type(exc).__name__}: {_first_line(exc)})")
            raise PeerFailure(self.lost_record(), rank=self.rank) from exc

    def _lose(self, detail: str) -> None:
        if self.lost is None:
            self.lost = self.host.lost(reported_by=self.rank, detail=detail)

    def mark_lost(self, detail: str) -> FailureRecord:
        """Declare the store lost (e.g. another connection to it stopped answering): later
        calls fail at once. Returns the record (the first one, if it was lost before)."""
        self._lose(detail)
        return self.lost_record()

    def lost_record(self) -> FailureRecord:
        if self.lost is None:
            raise RuntimeError("lost_record of a store that answers")
        return self.lost

    def set(self, key: str, value: str) -> None:
        self.call(lambda s: s.set(key, value), f"set({key!r})")

    def get(self, key: str) -> bytes:
        return self.call(lambda s: s.get(key), f"get({key!r})")

    def add(self, key: str, amount: int) -> int:
        return self.call(lambda s: s.add(key, amount), f"add({key!r})")

    def check(self, keys: Sequence[str]) -> bool:
        return self.call(lambda s: s.check(list(keys)), f"check({list(keys)!r})")

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self.call(lambda s: s.compare_set(key, expected, desired), f"compare_set({key!r})")

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return self.call(lambda s: s.multi_get(list(keys)), f"multi_get({len(keys)} keys)")

    def clone(self, timeout: float | None = None) -> BoundedStore:
        """A second connection to the same store (for another thread), made within ``timeout``.

        Connecting retries for the store's own timeout (the process group's, 30
        minutes by default); it is shortened to ``timeout`` while the clone
        connects, so a worker left behind by a server that exited ends soon too.
        """
        limit = self.timeout if timeout is None else timeout

        def connect(store: Store) -> Store:
            before: datetime.timedelta = store.timeout  # type: ignore[attr-defined]
            store.set_timeout(datetime.timedelta(seconds=limit))
            try:
                copy: Store = store.clone()  # type: ignore[attr-defined]
            finally:
                store.set_timeout(before)
            copy.set_timeout(datetime.timedelta(seconds=limit))  # its own waits, like ours
            return copy

        return BoundedStore(self.call(connect, "a new connection", limit), rank=self.rank,
                            timeout=self.timeout, host=self.host)

    def close(self) -> None:
        """Let the worker thread end (it ends after the operation it runs, if any)."""
        with self._lock:
            self._closed = True
            if self._worker is not None:
                self._jobs.put(None)
                self._worker = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split())[:200] if text else ""
