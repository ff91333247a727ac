"""The Gantt chart draws each action on the rank the schedule's placement gives its stage:
the V of zb-v / dualpipe-v (stage 2p - 1 - s back on rank s) and a synthesised schedule."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from pipec.schedule.generators import make_schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import Simulation, simulate
from pipec.schedule.synth import synthesize
from pipec.viz.svg import schedule_svg

SVG = "{http://www.w3.org/2000/svg}"


def _boxes(sim: Simulation, colour_by: str) -> list[tuple[int, int, float]]:
    """(stage, rank from the tooltip, box top) for every compute box."""
    root = ET.fromstring(schedule_svg(sim, colour_by=colour_by))  # type: ignore[arg-type]
    out = []
    for g in root.iter(f"{SVG}g"):
        if "data-mb" not in g.attrib:  # the legend swatches carry data-stage only
            continue
        rect = g.find(f"{SVG}rect")
        assert rect is not None
        title = rect.find(f"{SVG}title")
        assert title is not None and title.text is not None
        found = re.search(r" on rank (\d+):", title.text)
        assert found is not None
        out.append((int(g.attrib["data-stage"]), int(found.group(1)), float(rect.attrib["y"])))
    return out


@pytest.mark.parametrize("colour_by", ["kind", "stage"])
@pytest.mark.parametrize("source", ["zb-v", "dualpipe-v", "synth"])
def test_gantt_puts_each_stage_on_its_placed_rank(source: str, colour_by: str) -> None:
    if source == "synth":
        forward = [1.0, 1.0, 1.0, 1.5]
        sched = synthesize(4, 4, 2, forward=forward, input_grad=forward, weight_grad=0.6).schedule
    else:
        sched = make_schedule(source, 4, 4, 2)
    sim = simulate(lower(sched), forward=1.0, input_grad=1.0, weight_grad=0.6, comm=0.1)
    boxes = _boxes(sim, colour_by)
    assert len(boxes) == sum(1 for e in sim.timeline if e.action.kind.is_compute)
    rows = {}
    for stage, rank, top in boxes:
        assert rank == sched.rank_of(stage) == (0, 1, 1, 0)[stage]
        rows.setdefault(rank, set()).add(top)
    assert all(len(tops) == 1 for tops in rows.values())  # one row per rank
    assert rows[0] != rows[1]
