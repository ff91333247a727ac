"""Measured timelines of the runtime, kept per step and written as Chrome trace JSON.

Phase: stage runtime (bookkeeping). The executor measures ``(start, end, rank,
action)`` per action in seconds from its step's start; :class:`TimelineLog`
keeps the recent steps with each step's start on this rank's clock, and
:func:`chrome_trace_document` writes them in the format
:mod:`pipec.viz.report_measured` reads back (``timeline_rank<r>.json``)::

    {"traceEvents": [{"name": "1F0", "ph": "X", "ts": <us>, "dur": <us>,
                      "pid": 0, "tid": <rank>, "args": {"step": <k>}}, ...]}

Steps are laid end to end: ``ts`` counts from the first kept step's start.
The events come from :func:`pipec.timeline_format.chrome_trace`; this module
adds ``args.step`` so several steps of one rank can be told apart. Besides
the schedule's actions a step may hold one ``ALLREDUCE`` span: the
tied-gradient all-reduces after the last action
(:data:`pipec.timeline_format.ALLREDUCE`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipec.timeline_format import MEMORY, chrome_trace

TimelineEvent = tuple[float, float, int, str]  # (start, end, rank, action), seconds from step start


class Clock:
    """Action timing: ``perf_counter`` on CPU, CUDA events on GPU (resolved at step end)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t0 = 0.0
        self._events: list[tuple[Any, Any, str]] = []
        self._cpu: list[tuple[float, float, str]] = []
        self._e0: Any = None

    @property
    def origin(self) -> float:
        return self._t0

    def begin(self) -> None:
        self._events, self._cpu = [], []
        if self.cuda:
            self._e0 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self._e0.record()
        self._t0 = time.perf_counter()

    def start(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            e.record()
            return e
        return time.perf_counter()

    def stop(self, started: Any, text: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            e.record()
            self._events.append((started, e, text))
        else:
            self._cpu.append((started - self._t0, time.perf_counter() - self._t0, text))

    def last_event(self, rank: int) -> TimelineEvent:
        """The last span recorded, alone (on CUDA this waits for its end event only)."""
        if self.cuda:
            s, e, t = self._events[-1]
            e.synchronize()
            return (self._e0.elapsed_time(s) / 1e3, self._e0.elapsed_time(e) / 1e3, rank, t)
        s0, e0, t0 = self._cpu[-1]
        return (s0, e0, rank, t0)

    def events(self, rank: int) -> list[TimelineEvent]:
        if self.cuda:
            torch.cuda.synchronize()
            return [
                (self._e0.elapsed_time(s) / 1e3, self._e0.elapsed_time(e) / 1e3, rank, t)
                for s, e, t in self._events
            ]
        return [(s, e, rank, t) for s, e, t in self._cpu]


@dataclass(frozen=True)
class StepTimeline:
    step: int
    started: float  # perf_counter seconds at the step's start, this rank's clock
    events: tuple[TimelineEvent, ...]


class TimelineLog:
    """The last ``max_steps`` steps' timelines of one rank."""

    def __init__(self, max_steps: int = 1000) -> None:
        self._steps: deque[StepTimeline] = deque(maxlen=max_steps)

    def add(self, step: int, started: float, events: list[TimelineEvent]) -> None:
        self._steps.append(StepTimeline(step, started, tuple(events)))

    def append_to_last(self, event: TimelineEvent) -> None:
        """Add ``event`` to the last step (a span resolved after the step was recorded)."""
        if self._steps:
            last = self._steps[-1]
            self._steps[-1] = StepTimeline(last.step, last.started, (*last.events, event))

    def last(self) -> list[TimelineEvent]:
        return list(self._steps[-1].events) if self._steps else []

    def steps(self) -> list[StepTimeline]:
        return list(self._steps)


def chrome_trace_document(steps: list[StepTimeline]) -> dict[str, Any]:
    """Chrome trace events for ``steps`` (microseconds, one thread per rank), each
    action event carrying ``args.step``."""
    origin = steps[0].started if steps else 0.0
    timeline: list[tuple[float, float, int, str]] = []
    step_of: list[int] = []
    for st in steps:
        offset = st.started - origin
        for start, end, rank, action in st.events:
            timeline.append((offset + start, offset + end, rank, action))
            step_of.append(st.step)
    doc = chrome_trace(timeline, process_name="pipec runtime")
    spans = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    for event, step in zip(spans, step_of):  # chrome_trace keeps the events' order
        event.setdefault("args", {})["step"] = step
    return doc


def write_chrome_trace(path: str | Path, steps: list[StepTimeline],
                       memory: tuple[int, int, int] | None = None) -> Path:
    """Write ``steps``; ``memory``: ``(rank, peak_bytes, predicted_bytes)`` of the last
    training step, as a counter event named :data:`pipec.timeline_format.MEMORY`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = chrome_trace_document(steps)
    if memory is not None:
        rank, peak, predicted = memory
        end = max((e["ts"] + e["dur"] for e in doc["traceEvents"] if e.get("ph") == "X"), default=0.0)
        doc["traceEvents"].append({"name": MEMORY, "ph": "C", "ts": end, "pid": 0, "tid": rank,
                                   "args": {"peak_bytes": peak, "predicted_bytes": predicted}})
    out.write_text(json.dumps(doc), encoding="utf-8")
    return out
