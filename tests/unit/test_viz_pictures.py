"""Pictures: the text grid, SVG charts that parse, and a trace that loads as JSON."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from pipec.schedule.generators import make_schedule
from pipec.schedule.grid import index_columns, schedule_grid
from pipec.schedule.ir import Action, Schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import Simulation, simulate
from pipec.timeline_format import chrome_trace
from pipec.viz.grid import schedule_grid_rich
from pipec.viz.svg import memory_svg, schedule_svg

SVG = "{http://www.w3.org/2000/svg}"

GPIPE_GRID = """\
step    0   1   2   3   4   5   6   7
rank 0: 0F0 0F1 .   .   .   .   0B0 0B1
rank 1: .   1F0 1F1 .   .   1B0 1B1 .
rank 2: .   .   2F0 2F1 2B0 2B1 .   .
"""


def _simulation(name: str = "interleaved-1f1b") -> Simulation:
    v = 2 if name == "interleaved-1f1b" else 1
    return simulate(
        lower(make_schedule(name, 2 * v, 4, v)),
        forward=1e-3,
        input_grad=2e-3,
        weight_grad=1e-3,
        comm=1e-4,
        activation_bytes=[2**20 * (s + 1) for s in range(2 * v)],
    )


def test_grid_draws_bubbles_as_dots() -> None:
    assert schedule_grid(make_schedule("gpipe", 3, 2)) == GPIPE_GRID


def test_grid_marks_and_windows() -> None:
    schedule = make_schedule("1f1b", 4, 16)
    text = schedule_grid(schedule, marks=[(2, 10)], columns=index_columns(schedule), window=9)
    lines = text.splitlines()
    assert lines[0].startswith("step    ... 6")
    assert "[2B4]" in lines[3] and lines[3].endswith("...")
    assert all(len(line.split()) <= 2 + 9 + 2 for line in lines)


def test_grid_of_a_deadlocked_schedule_still_draws() -> None:
    text = schedule_grid(Schedule.from_text("0: 0F0 0B0 0F1 0B1\n1: 1F1 1B1 1F0 1B0\n"))
    assert "1F1" in text and "0B1" in text


def test_rich_grid_renders() -> None:
    console = Console(record=True, width=200, color_system="truecolor")
    console.print(schedule_grid_rich(make_schedule("zb-h1", 2, 3)))
    plain = console.export_text()
    assert "1W2" in plain and "rank 1:" in plain


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"])
def test_schedule_svg_parses_and_has_one_box_per_compute_action(name: str) -> None:
    sim = _simulation(name)
    root = ET.fromstring(schedule_svg(sim).split("\n", 1)[1])
    assert root.tag == f"{SVG}svg"
    boxes = [
        r
        for r in root.iter(f"{SVG}rect")
        if r.find(f"{SVG}title") is not None and "waits" not in (r.findtext(f"{SVG}title") or "")
    ]
    computes = [e for e in sim.timeline if e.action.kind.is_compute]
    assert len(boxes) == len(computes)
    labels = {t.text for t in root.iter(f"{SVG}text")}
    assert {"0", "1", "2", "3"} <= labels  # micro-batch numbers in the boxes


def test_schedule_svg_of_a_bare_schedule() -> None:
    svg = schedule_svg(make_schedule("1f1b", 2, 2))
    root = ET.fromstring(svg.split("\n", 1)[1])
    assert any("bubble" in (t.text or "") for t in root.iter(f"{SVG}text"))


def test_memory_svg_parses() -> None:
    sim = _simulation()
    root = ET.fromstring(memory_svg(sim).split("\n", 1)[1])
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == sim.num_ranks
    assert "MiB" in memory_svg(sim)


def test_chrome_trace_loads_as_json() -> None:
    sim = _simulation()
    trace = json.loads(json.dumps(chrome_trace(sim.timeline)))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(sim.timeline)
    first = events[0]
    assert first["ts"] == pytest.approx(sim.timeline[0].start * 1e6)
    assert {e["tid"] for e in events} == {0, 1}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"rank 0", "rank 1"}


def test_chrome_trace_accepts_measured_text_actions() -> None:
    trace = chrome_trace(
        [(0.0, 0.5, 1, "1F0"), (0.5, 0.75, 1, "optimizer"), (0.0, 0.25, 0, Action.parse("0B0"))]
    )
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["dur"]) for e in events] == [
        ("1F0", "F", 500000.0),
        ("optimizer", "other", 250000.0),
        ("0B0", "B", 250000.0),
    ]


def test_schedule_svg_draws_the_collectives_after_the_schedule() -> None:
    from pipec.schedule.simulator import Collective

    sim = simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=2.0, weight_grad=1.0,
                   collectives=[Collective("all-reduce embed.weight", (0, 1), 4.0)])
    svg = schedule_svg(sim, width=960)
    ET.fromstring(svg)
    assert svg.count('data-kind="collective"') == 2  # one box on each rank
    assert "all-reduce embed.weight on ranks 0, 1" in svg and ">all-reduce</text>" in svg
