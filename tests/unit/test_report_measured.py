"""Reading the measured timelines a run leaves in the plan directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipec.schedule.ir import Action
from pipec.viz.report_layout import Arc, assign_levels
from pipec.viz.report_measured import load_measured


def event(name: str, ts: float, dur: float, rank: int = 0, **args: object) -> dict[str, object]:
    out: dict[str, object] = {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": rank}
    if args:
        out["args"] = args
    return out


def write(directory: Path, rank: int, events: object) -> None:
    (directory / f"timeline_rank{rank}.json").write_text(json.dumps({"traceEvents": events}))


def test_no_directory_or_no_files_is_none(tmp_path: Path) -> None:
    assert load_measured(tmp_path / "missing") is None
    assert load_measured(tmp_path) is None
    (tmp_path / "timeline_rankX.json").write_text("{}")  # not a rank's timeline: ignored
    assert load_measured(tmp_path) is None


def test_steps_from_args_and_from_repetition(tmp_path: Path) -> None:
    # rank 0 marks its steps; rank 1 does not: its k-th 1F0 belongs to step k
    write(tmp_path, 0, [event("0F0", 100, 10, step=0), event("0B0", 130, 20, step=0),
                        event("0F0", 1100, 12, step=1), event("0B0", 1130, 22, step=1),
                        event("step", 0, 5000), {"name": "thread_name", "ph": "M", "pid": 0}])
    write(tmp_path, 1, [event("1F0", 112, 10, 1), event("1B0", 122, 8, 1),
                        event("1F0", 1114, 10, 1), event("1B0", 1124, 6, 1)])
    m = load_measured(tmp_path)
    assert m is not None
    assert m.ranks == (0, 1) and m.num_steps == 2 and m.warnings == ()
    assert m.step_times == pytest.approx((50e-6, 52e-6))
    assert m.durations(0, "F") == pytest.approx([10e-6, 12e-6])
    assert m.durations(1, "B") == pytest.approx([8e-6, 6e-6])
    first = m.timeline(0)
    assert first[0][:3] == pytest.approx((0.0, 10e-6, 0)) and first[0][3] == Action.parse("0F0")
    assert [str(a) for *_, a in first] == ["0F0", "1F0", "1B0", "0B0"]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "JSON"),
        ('{"events": []}', "traceEvents"),
        ('{"traceEvents": [3]}', "expected an object"),
        ('{"traceEvents": [{"name": "0F0", "ph": "X", "ts": 1}]}', "dur=None"),
        ('{"traceEvents": [{"name": "0F0", "ph": "X", "ts": "1", "dur": 2}]}', "ts='1'"),
        ('{"traceEvents": [{"name": "0F0", "ph": "X", "ts": 1, "dur": -2}]}', "negative"),
        ('{"traceEvents": [{"name": "0F0", "ph": "X", "ts": 1, "dur": 2, "args": {"step": "a"}}]}', "args.step"),
        ('{"traceEvents": [{"name": "step", "ph": "X", "ts": 1, "dur": 2}]}', "no action events"),
    ],
)
def test_malformed_file_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, reason: str
) -> None:
    write(tmp_path, 0, [event("0F0", 0, 5)])
    (tmp_path / "timeline_rank1.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        m = load_measured(tmp_path)
    assert m is not None and m.ranks == (0,) and m.files == ("timeline_rank0.json",)
    assert len(m.warnings) == 1 and "timeline_rank1.json" in m.warnings[0] and reason in m.warnings[0]
    assert "timeline_rank1.json" in caplog.text


def test_every_file_malformed_is_none(tmp_path: Path) -> None:
    (tmp_path / "timeline_rank0.json").write_bytes(b"\xff\xfe")
    assert load_measured(tmp_path) is None


def test_typical_step_is_the_median_one(tmp_path: Path) -> None:
    write(tmp_path, 0, [event("0F0", 0, 100), event("0F0", 1000, 10), event("0F0", 2000, 12)])
    m = load_measured(tmp_path)
    assert m is not None and m.num_steps == 3
    assert m.step_time == pytest.approx(12e-6) and m.typical_step == 2


def test_arc_levels_nest_and_never_overlap() -> None:
    def arc(x1: float, x2: float) -> Arc:
        return Arc(x1, x2, "x", None, 0)  # type: ignore[arg-type]

    arcs = [arc(0, 1000), arc(100, 200), arc(300, 400), arc(150, 350)]
    levels = assign_levels(arcs)
    assert levels[1] == levels[2] == 0  # disjoint short arcs share the lowest level
    assert levels[3] == 1 and levels[0] == 2  # an arc flies above every arc it overlaps


def test_reads_what_the_runtime_writes(tmp_path: Path) -> None:
    timeline = pytest.importorskip("pipec.runtime.timeline")
    steps = [
        timeline.StepTimeline(step=5, started=100.0, events=((0.0, 0.002, 1, "1F0"), (0.002, 0.003, 1, "1SEND_F0"))),
        timeline.StepTimeline(step=6, started=100.5, events=((0.0, 0.001, 1, "1F0"), (0.001, 0.002, 1, "1SEND_F0"))),
    ]
    timeline.write_chrome_trace(tmp_path / "timeline_rank1.json", steps)
    m = load_measured(tmp_path)
    assert m is not None and m.ranks == (1,) and m.warnings == ()
    assert m.step_times == pytest.approx((0.003, 0.002))
    assert m.durations(1, "F") == pytest.approx([0.002, 0.001])
    assert [str(a) for *_, a in m.timeline(1)] == ["1F0", "1SEND_F0"]


def test_allreduce_spans_are_kept_apart_and_end_the_step(tmp_path: Path) -> None:
    from pipec.viz.report_compare import measured_simulation

    write(tmp_path, 0, [event("0F0", 0, 10, step=0), event("0B0", 30, 20, step=0),
                        event("ALLREDUCE", 50, 15, step=0), event("optimizer", 65, 5, step=0)])
    write(tmp_path, 1, [event("1F0", 10, 10, 1, step=0), event("1B0", 20, 10, 1, step=0),
                        event("ALLREDUCE", 30, 35, 1, step=0)])
    m = load_measured(tmp_path)
    assert m is not None
    assert [str(a.action) for a in m.actions] == ["0F0", "0B0", "1F0", "1B0"]
    spans = m.spans(0)
    assert [(c.rank, c.name) for c in spans] == [(1, "ALLREDUCE"), (0, "ALLREDUCE")]
    assert [(c.start, c.duration) for c in spans] == [pytest.approx((30e-6, 35e-6)), pytest.approx((50e-6, 15e-6))]
    assert m.step_times == pytest.approx((65e-6,))  # to the all-reduce's end; "optimizer" is ignored
    from pipec.plan import PlanData
    from pipec.schedule.generators import make_schedule

    data = PlanData.model_construct(num_ranks=2, num_stages=2, num_microbatches=1, stages_per_rank=1,
                                    schedule=make_schedule("1f1b", 2, 1))
    sim = measured_simulation(m, 0, data)
    assert [c.ranks for c in sim.collectives] == [(1,), (0,)]
    assert [c.start for c in sim.collectives] == pytest.approx([30e-6, 50e-6])
    assert sim.step_time == pytest.approx(65e-6)
    # the per-action table: the all-reduce as the last rank to join saw it (15 us, not
    # rank 1's 35 us of waiting), against the predicted collectives
    from pipec.schedule.simulator import Collective, simulate
    from pipec.viz.report_compare import action_comparison, measured_allreduce

    assert measured_allreduce(m) == pytest.approx([15e-6])
    predicted = simulate(make_schedule("1f1b", 2, 1), forward=1e-5, input_grad=1e-5, weight_grad=0.0,
                         collectives=[Collective("all-reduce w", (0, 1), 1e-5)])
    table = action_comparison(m, predicted)
    row = table[table.index(">ALLREDUCE<"):]
    assert ">0.01<" in row and ">0.015<" in row and "1.50\u00d7" in row


def test_a_file_of_allreduce_spans_only_is_malformed(tmp_path: Path) -> None:
    write(tmp_path, 0, [event("ALLREDUCE", 0, 10, step=0)])
    assert load_measured(tmp_path) is None


def test_the_clock_and_the_log_resolve_a_late_span() -> None:
    import torch

    from pipec.runtime.timeline import Clock, TimelineLog

    clock = Clock(torch.device("cpu"))
    clock.begin()
    first = clock.start()
    clock.stop(first, "0F0")
    second = clock.start()
    clock.stop(second, "ALLREDUCE")
    start, end, rank, name = clock.last_event(3)
    assert (rank, name) == (3, "ALLREDUCE") and 0.0 <= start <= end
    log = TimelineLog()
    log.append_to_last((0.0, 1.0, 0, "ALLREDUCE"))  # nothing recorded yet: ignored
    assert log.steps() == []
    log.add(0, 10.0, [(0.0, 0.5, 0, "0F0")])
    log.append_to_last((0.5, 1.0, 0, "ALLREDUCE"))
    assert log.last() == [(0.0, 0.5, 0, "0F0"), (0.5, 1.0, 0, "ALLREDUCE")]
    assert log.steps()[-1].started == 10.0
