"""Measured timelines: what the runtime recorded, read back for the report.

Phase: after ``pipec run``. Each rank writes ``timeline_rank<r>.json`` into
the plan directory, a Chrome-trace document::

    {"traceEvents": [{"name": "1F0", "ph": "X", "ts": <us>, "dur": <us>,
                      "pid": 0, "tid": <rank>, "args": {"step": 0}}, ...]}

:func:`load_measured` reads every such file into a :class:`Measured`; a file
that is missing is simply absent, a file that is malformed is left out with a
warning (logged and kept in :attr:`Measured.warnings` so the report shows it).
Events named ``ALLREDUCE`` (the tied-gradient all-reduce after a step's
actions) are kept apart, as :attr:`Measured.collectives`, and count in the
step's time; other events whose name is not an action (``"step"``,
``"optimizer"``) are ignored. When an event carries no ``args.step``, the
k-th occurrence of an action on a rank is taken to belong to step k.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action
from pipec.timeline_format import ALLREDUCE, MEMORY

logger = logging.getLogger(__name__)

TIMELINE_GLOB = "timeline_rank*.json"
_FILE_RE = re.compile(r"^timeline_rank(\d+)\.json$")
_US = 1e-6


@dataclass(frozen=True)
class MeasuredAction:
    """One action one rank ran: times in seconds from the start of its step."""

    rank: int
    action: Action
    step: int
    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class MeasuredSpan:
    """A measured span that is not an action (an all-reduce): seconds from its step's start."""

    rank: int
    name: str
    step: int
    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class Measured:
    """Every measured action of every rank, grouped into training steps."""

    actions: tuple[MeasuredAction, ...]
    step_times: tuple[float, ...]  # one per step: last end minus first start over all ranks
    ranks: tuple[int, ...]
    files: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    collectives: tuple[MeasuredSpan, ...] = ()  # ALLREDUCE spans, counted in step_times
    memory: dict[int, int] = field(default_factory=dict)  # rank -> measured peak bytes (last step)

    @property
    def num_steps(self) -> int:
        return len(self.step_times)

    @property
    def step_time(self) -> float:
        """The median step time (robust to a slow first step)."""
        return statistics.median(self.step_times) if self.step_times else 0.0

    @property
    def typical_step(self) -> int:
        """The step whose time is closest to the median: the one worth drawing."""
        median = self.step_time
        return min(range(self.num_steps), key=lambda s: (abs(self.step_times[s] - median), -s))

    def durations(self, stage: int, kind: str) -> list[float]:
        """Durations of every ``stage``/``kind`` action over all steps and micro-batches."""
        return [m.duration for m in self.actions if m.action.stage == stage and m.action.kind.value == kind]

    def timeline(self, step: int) -> list[tuple[float, float, int, Action]]:
        """``(start, end, rank, action)`` of one step, the shape a Simulation's timeline has."""
        return sorted(
            (m.start, m.end, m.rank, m.action) for m in self.actions if m.step == step
        )

    def spans(self, step: int) -> list[MeasuredSpan]:
        """The collectives of one step, by start."""
        return sorted((c for c in self.collectives if c.step == step), key=lambda c: (c.start, c.rank))


class _Malformed(Exception):
    """A timeline file that cannot be read; the message says why."""


def _number(event: dict[str, object], key: str, index: int) -> float:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Malformed(f"event {index} ({event.get('name')!r}) has {key}={value!r}, expected a number")
    return float(value)


Event = tuple[int | None, "Action | str", float, float]  # (step or None, action or ALLREDUCE, ts, dur)


def _read_events(path: Path, rank: int) -> list[Event]:
    """``(step or None, action, ts seconds, dur seconds)`` of one file's action
    events, and of its ALLREDUCE spans (the name in place of the action)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Malformed(f"not readable as JSON: {exc}") from exc
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise _Malformed("expected an object with a 'traceEvents' list (Chrome trace format)")
    out: list[Event] = []
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise _Malformed(f"event {index} is {type(event).__name__}, expected an object")
        name = event.get("name")
        if event.get("ph", "X") != "X" or not isinstance(name, str):
            continue
        action: Action | str = ALLREDUCE
        if name != ALLREDUCE:
            try:
                action = Action.parse(name)
            except ScheduleError:
                continue  # a non-action span such as "step" or "optimizer"
        ts = _number(event, "ts", index)
        dur = _number(event, "dur", index)
        if dur < 0:
            raise _Malformed(f"event {index} ({name!r}) has a negative duration {dur}")
        args = event.get("args")
        step = args.get("step") if isinstance(args, dict) else None
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise _Malformed(f"event {index} ({name!r}) has args.step={step!r}, expected an int >= 0")
        out.append((step, action, ts * _US, dur * _US))
    if not any(isinstance(e[1], Action) for e in out):
        raise _Malformed(f"no action events (names such as '{rank}F0') with ph='X'")
    return out


def _assign_steps(raw: list[Event]) -> list[tuple[int, Action | str, float, float]]:
    seen: dict[Action | str, int] = {}
    out = []
    for step, action, ts, dur in sorted(raw, key=lambda e: e[2]):
        if step is None:
            step = seen.get(action, 0)
            seen[action] = step + 1
        out.append((step, action, ts, dur))
    return out


def load_measured(directory: str | Path) -> Measured | None:
    """Read every ``timeline_rank<r>.json`` in ``directory``.

    Returns None when there is no readable timeline (never ran, or every file
    is malformed); malformed files are skipped with a logged warning.
    """
    directory = Path(directory)
    per_rank: dict[int, list[tuple[int, Action | str, float, float]]] = {}
    memory: dict[int, int] = {}
    files: list[str] = []
    warnings: list[str] = []
    paths = sorted(directory.glob(TIMELINE_GLOB)) if directory.is_dir() else []
    for path in paths:
        match = _FILE_RE.match(path.name)
        if match is None:
            continue
        rank = int(match.group(1))
        try:
            per_rank[rank] = _assign_steps(_read_events(path, rank))
            peak = _read_memory(path)
            if peak is not None:
                memory[rank] = peak
        except _Malformed as exc:
            message = f"{path.name}: {exc}; left out of the measured timeline"
            logger.warning("measured timeline %s", message)
            warnings.append(message)
            continue
        files.append(path.name)
    if not per_rank:
        if warnings:
            logger.warning("no readable measured timeline in %s", directory)
        return None
    return dataclasses.replace(_group_steps(per_rank, tuple(files), tuple(warnings)), memory=memory)


def _read_memory(path: Path) -> int | None:
    """The measured peak bytes of the file's :data:`~pipec.timeline_format.MEMORY` counter
    (the last one), or None (the run did not measure memory)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    found = None
    for event in events if isinstance(events, list) else []:
        if isinstance(event, dict) and event.get("ph") == "C" and event.get("name") == MEMORY:
            args = event.get("args")
            peak = args.get("peak_bytes") if isinstance(args, dict) else None
            if isinstance(peak, int) and not isinstance(peak, bool) and peak >= 0:
                found = peak
    return found


def _group_steps(
    per_rank: dict[int, list[tuple[int, Action | str, float, float]]],
    files: tuple[str, ...],
    warnings: tuple[str, ...],
) -> Measured:
    steps = sorted({e[0] for events in per_rank.values() for e in events})
    origin: dict[int, float] = {}
    finish: dict[int, float] = {}
    for events in per_rank.values():
        for step, _action, ts, dur in events:
            origin[step] = min(origin.get(step, ts), ts)
            finish[step] = max(finish.get(step, ts + dur), ts + dur)
    index = {step: i for i, step in enumerate(steps)}  # renumber to 0..num_steps-1
    actions = tuple(
        MeasuredAction(rank, action, index[step], ts - origin[step], dur)
        for rank, events in sorted(per_rank.items())
        for step, action, ts, dur in events
        if isinstance(action, Action)
    )
    spans = tuple(
        MeasuredSpan(rank, action, index[step], ts - origin[step], dur)
        for rank, events in sorted(per_rank.items())
        for step, action, ts, dur in events
        if not isinstance(action, Action)
    )
    return Measured(
        actions=actions,
        step_times=tuple(finish[s] - origin[s] for s in steps),
        ranks=tuple(sorted(per_rank)),
        files=files,
        warnings=warnings,
        collectives=spans,
    )
