"""A timeline as a Chrome / Perfetto trace (open it at ui.perfetto.dev or chrome://tracing).

The timeline format, shared by the simulator's and the runtime's timelines:
the runtime writes ``timeline_rank<r>.json`` with it and :mod:`pipec.viz`
reads it back, so it lives in a neutral, low module (the runtime never imports
viz). Pure. Input: a timeline of ``(start, end, rank, action)`` tuples in
seconds -- a simulated :attr:`Simulation.timeline
<pipec.schedule.simulator.Simulation.timeline>` or a measured one from the
runtime, where ``action`` is an :class:`~pipec.schedule.ir.Action` or its text
(``"2F0"``). Output: the trace as a JSON-ready ``dict`` in the Trace Event
Format: one complete event (``"ph": "X"``) per action, ``ts``/``dur`` in
microseconds, one thread (``tid``) per rank, named ``rank <k>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipec.errors import ScheduleError
from pipec.schedule.ir import Action

#: The name of the span a runtime step's tied-gradient all-reduces take, after its actions.
ALLREDUCE = "ALLREDUCE"
#: A stage's data-parallel gradient all-reduce across replicas, named ``<stage>DP_ALLREDUCE``:
#: from its start (right after the stage's last backward) to when the rank saw it complete.
DP_ALLREDUCE = "DP_ALLREDUCE"

#: The name of the counter event (``"ph": "C"``) with a rank's measured peak memory over
#: its last training step (``args``: ``peak_bytes``, ``predicted_bytes``), written when
#: the runtime measured it (:meth:`pipec.PipelineRuntime.memory_stats`).
MEMORY = "peak memory"


def _as_action(action: Action | str) -> Action | None:
    if isinstance(action, Action):
        return action
    try:
        return Action.parse(str(action))
    except ScheduleError:
        return None  # a measured event the IR does not name (e.g. "optimizer"): keep its text


def chrome_trace(
    timeline: Iterable[tuple[float, float, int, Action | str]],
    *,
    process_name: str = "pipec",
) -> dict[str, Any]:
    """The Trace Event Format document of ``timeline`` (``json.dumps`` it to save)."""
    events: list[dict[str, Any]] = []
    ranks: set[int] = set()
    for start, end, rank, action in timeline:
        parsed = _as_action(action)
        args: dict[str, Any] = {}
        category = "other"
        if parsed is not None:
            category = parsed.kind.value
            args = {"stage": parsed.stage, "microbatch": parsed.microbatch, "kind": category}
        ranks.add(int(rank))
        events.append(
            {
                "name": str(parsed if parsed is not None else action),
                "cat": category,
                "ph": "X",
                "ts": float(start) * 1e6,
                "dur": max(0.0, float(end) - float(start)) * 1e6,
                "pid": 0,
                "tid": int(rank),
                "args": args,
            }
        )
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": process_name}}
    ]
    for rank in sorted(ranks):
        meta.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "args": {"name": f"rank {rank}"},
            }
        )
        meta.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "args": {"sort_index": rank},
            }
        )
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}
