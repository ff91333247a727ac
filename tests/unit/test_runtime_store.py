"""BoundedStore: no store operation outlasts its timeout, and a lost store is named.

A TCPStore client blocks without limit on a server that stopped answering;
these fakes stand for one (an operation that blocks until released) and for a
server that exited (an operation raising DistNetworkError).
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore

from pipec.errors import RuntimeFailure
from pipec.runtime.failure import PeerFailure
from pipec.runtime.store import BoundedStore, StoreHost, store_host

RANK0 = StoreHost(0, "hosted by rank 0 at 127.0.0.1:29500")


class Stuck:
    """A store whose server is stopped: every operation blocks until ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def add(self, key: str, amount: int) -> int:
        self.calls += 1
        self.release.wait()
        return 0


class Gone:
    """A store whose server exited: the connection is reset."""

    def add(self, key: str, amount: int) -> int:
        raise dist.DistNetworkError("Connection reset by peer")


def test_an_operation_that_does_not_answer_marks_the_store_lost_and_names_its_host() -> None:
    stuck = Stuck()
    store = BoundedStore(stuck, rank=1, timeout=0.2, host=RANK0)  # type: ignore[arg-type]
    try:
        with pytest.raises(PeerFailure) as info:
            store.add("heartbeat/1", 1)
        assert isinstance(info.value, RuntimeFailure)
        assert info.value.rank == 1 and info.value.failed_rank == 0
        assert "rank 0 is unreachable" in str(info.value) and "did not answer add('heartbeat/1')" in str(info.value)
        # lost for good: the next call fails at once, without queueing behind the stuck one
        with pytest.raises(PeerFailure, match="did not answer"):
            store.set("k", "v")
        assert stuck.calls == 1
    finally:
        stuck.release.set()
        store.close()


def test_a_reset_connection_marks_the_store_lost() -> None:
    store = BoundedStore(Gone(), rank=1, timeout=5.0, host=RANK0)  # type: ignore[arg-type]
    with pytest.raises(PeerFailure, match="closed the connection .*DistNetworkError: Connection reset"):
        store.add("k", 1)
    assert store.lost is not None and store.lost.rank == 0 and store.lost.reported_by == 1
    store.close()


def test_a_store_under_torchrun_names_the_launcher() -> None:
    record = StoreHost(None, "hosted by the launcher (torchrun) at h:1").lost(reported_by=2, detail="did not answer")
    assert record.rank is None and "launcher (torchrun) exited" in record.message


def test_operations_and_clone_work_on_a_real_store() -> None:
    raw = HashStore()
    store = BoundedStore(raw, rank=0, timeout=5.0)
    assert store.host.rank is None  # an in-memory store has no host that could go
    assert store.add("n", 2) == 2 and store.check(["n"]) and not store.check(["m"])
    store.set("k", "v")
    assert store.get("k") == b"v" and store.multi_get(["k"]) == [b"v"]
    assert store.compare_set("f", "", "first") == b"first" and store.compare_set("f", "", "second") == b"first"
    assert store_host(raw).rank is None
    store.close()


def test_the_worker_ends_when_the_store_is_dropped() -> None:
    store = BoundedStore(HashStore(), rank=0, timeout=5.0)
    store.set("k", "v")
    # the thread the store's operations run on (submit's public contract)
    worker = store.submit(lambda raw: threading.current_thread()).result(timeout=5)
    assert worker is not threading.current_thread() and worker.is_alive()
    del store
    gc.collect()
    worker.join(10)
    assert not worker.is_alive()
