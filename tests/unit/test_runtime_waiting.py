"""Polling a collective: completion is noticed soon after it happens (a fake clock).

The first ``_YIELD_FOR`` seconds poll between yields of the core (each advances the
fake clock by ``YIELD``), then between sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from pipec.runtime import waiting
from pipec.runtime.waiting import Waiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.yields = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def sched_yield(self) -> None:
        self.yields += 1
        self.now += YIELD


YIELD = 2e-5  # what one yield of the core takes on the fake clock


def _fake(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(waiting.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(waiting.time, "sleep", clock.sleep)
    monkeypatch.setattr(waiting, "yield_core", clock.sched_yield)
    return clock


class DoneAt:
    """A collective that completes at ``at`` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, at: float) -> None:
        self.clock, self.at, self.waited = clock, at, False

    def is_completed(self) -> bool:
        return self.clock.now >= self.at

    def wait(self, timeout: Any = None) -> bool:
        self.waited = True
        return True


@pytest.mark.parametrize("duration", [0.0005, 0.003, 0.0187, 0.026, 0.2])
def test_a_collective_is_noticed_within_a_few_percent_of_its_duration(
    monkeypatch: pytest.MonkeyPatch, duration: float
) -> None:
    clock = _fake(monkeypatch)
    work = DoneAt(clock, duration)
    Waiter(rank=0, timeout=30.0, monitor=None).wait_collective(work, [1], "the all-reduce")  # type: ignore[arg-type]
    assert work.waited
    # a doubling backoff noticed a 26 ms all-reduce only at 51 ms
    assert duration <= clock.now <= duration * (1 + 1 / 16) + 1e-4
    if duration < waiting._YIELD_FOR:  # Gloo's threads share the core: yield it, do not sleep
        assert not clock.sleeps and clock.now <= duration + YIELD
    else:
        assert clock.yields and max(clock.sleeps) <= 0.05  # poll_interval: the monitor is asked this often


def test_a_collective_that_never_completes_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipec.runtime.failure import PeerFailure

    clock = _fake(monkeypatch)
    with pytest.raises(PeerFailure, match="rank 1"):
        Waiter(rank=0, timeout=2.0, monitor=None).wait_collective(DoneAt(clock, 1e9), [1], "the all-reduce")  # type: ignore[arg-type]
    assert 2.0 < clock.now < 2.1
