"""One palette: a stage has one hue in every picture, kind is its shade, the
Gantt chart's boxes carry what the report's hover highlight looks for."""

from __future__ import annotations

import colorsys
import re
import xml.etree.ElementTree as ET

import pytest

from pipec.schedule.generators import make_schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import Simulation, simulate
from pipec.viz import palette
from pipec.viz.report_layout import text_color
from pipec.viz.report_style import stage_color
from pipec.viz.svg import GANTT_RIGHT, schedule_svg

SVG = "{http://www.w3.org/2000/svg}"


def _simulation(name: str, num_stages: int = 4, stages_per_rank: int = 1) -> Simulation:
    return simulate(
        lower(make_schedule(name, num_stages, 4, stages_per_rank)),
        forward=1e-3,
        input_grad=2e-3,
        weight_grad=1e-3,
        comm=1e-4,
    )


def _boxes(svg: str) -> list[tuple[ET.Element, ET.Element]]:
    """``(group, rect)`` of every compute box of a Gantt chart."""
    root = ET.fromstring(svg.split("\n", 1)[1])  # parses as XML
    return [
        (g, rect)
        for g in root.iter(f"{SVG}g")
        if g.get("data-kind") in ("F", "B", "I", "W")
        for rect in g.findall(f"{SVG}rect")
    ]


def _fill(root_svg: str, fill: str) -> str:
    """A box's fill as a colour; a hatch pattern's fill is its background tint."""
    match = re.fullmatch(r"url\(#(.+)\)", fill)
    if match is None:
        return fill
    root = ET.fromstring(root_svg.split("\n", 1)[1])
    pattern = next(p for p in root.iter(f"{SVG}pattern") if p.get("id") == match.group(1))
    return pattern.find(f"{SVG}rect").get("fill")  # type: ignore[union-attr,return-value]


def _hue(colour: str) -> float:
    r, g, b = (int(colour[k : k + 2], 16) / 255 for k in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)[0]


def test_stage_colours_are_distinct_and_cycle() -> None:
    n = len(palette.STAGE_COLOURS)
    assert n >= 8 and len(set(palette.STAGE_COLOURS)) == n
    assert palette.stage_colour(n + 3) == palette.stage_colour(3)
    assert palette.COMM_COLOUR not in palette.STAGE_COLOURS
    assert palette.rank_colour(2) == palette.stage_colour(2)  # rank r's first stage is stage r
    assert stage_color(5) == palette.stage_colour(5)  # the report's old name still answers


def test_kind_is_a_shade_of_the_stage_colour() -> None:
    base = palette.stage_colour(1)
    assert palette.kind_fill(1, "F") == base
    light = palette.kind_fill(1, "B")
    assert light != base and abs(_hue(light) - _hue(base)) < 0.02
    assert palette.kind_fill(1, "RECV_F") == palette.COMM_COLOUR
    assert palette.is_hatched("W") and not palette.is_hatched("I")
    assert palette.tint("#000000", 0.5) == "#808080"
    assert text_color("#ffffff") == palette.INK and text_color("#000000") == palette.LIGHT_INK


@pytest.mark.parametrize(("name", "v"), [("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_colour_by_stage_same_stage_same_hue_different_stages_differ(name: str, v: int) -> None:
    sim = _simulation(name, num_stages=4, stages_per_rank=v)
    svg = schedule_svg(sim, colour_by="stage")
    boxes = _boxes(svg)
    assert len(boxes) == sum(1 for e in sim.timeline if e.action.kind.is_compute)
    hues: dict[str, set[float]] = {}
    forward: dict[str, set[str]] = {}
    for g, rect in boxes:
        stage = g.get("data-stage")
        assert stage is not None and g.get("data-mb") is not None
        colour = _fill(svg, rect.get("fill", ""))
        hues.setdefault(stage, set()).add(round(_hue(colour), 1))
        if g.get("data-kind") == "F":
            forward.setdefault(stage, set()).add(colour)
    assert all(len(h) == 1 for h in hues.values()), hues  # every kind of a stage: one hue
    assert all(forward[s] == {palette.stage_colour(int(s))} for s in forward)
    assert len({c for s in forward.values() for c in s}) == 4  # four stages, four colours


def test_colour_by_stage_shades_kinds_and_says_so() -> None:
    svg = schedule_svg(_simulation("zb-h1"), colour_by="stage")
    by_kind: dict[str, set[str]] = {}
    for g, rect in _boxes(svg):
        if g.get("data-stage") == "0":
            by_kind.setdefault(g.get("data-kind", ""), set()).add(rect.get("fill", ""))
    assert by_kind["F"] == {palette.stage_colour(0)}
    assert by_kind["I"] == {palette.kind_fill(0, "I")}
    assert all(f.startswith("url(#") for f in by_kind["W"])  # W: hatched
    assert "shade = kind" in svg and "colour = stage" in svg


def test_colour_by_kind_is_the_default_and_boxes_carry_data_attributes() -> None:
    sim = _simulation("1f1b")
    svg = schedule_svg(sim)
    assert svg == schedule_svg(sim, colour_by="kind")
    boxes = _boxes(svg)
    fills = {g.get("data-kind"): rect.get("fill") for g, rect in boxes}
    assert fills == {"F": palette.KIND_COLOURS["F"], "B": palette.KIND_COLOURS["B"]}
    assert {g.get("data-stage") for g, _ in boxes} == {"0", "1", "2", "3"}
    assert {g.get("data-mb") for g, _ in boxes} == {"0", "1", "2", "3"}
    with pytest.raises(ValueError, match="colour_by"):
        schedule_svg(sim, colour_by="rank")  # type: ignore[arg-type]


def test_last_time_label_fits_in_the_right_margin() -> None:
    sim = _simulation("1f1b")
    root = ET.fromstring(schedule_svg(sim, width=600).split("\n", 1)[1])
    last = [t for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "middle" and "ms" in (t.text or "")][-1]
    half = 6.2 * len(last.text or "") / 2
    assert float(last.get("x", "0")) + half <= 600
    assert half <= GANTT_RIGHT


def test_hatch_ids_differ_between_charts_on_one_page() -> None:
    a = schedule_svg(_simulation("zb-h1"), colour_by="stage")
    b = schedule_svg(_simulation("zb-h1"), colour_by="stage", title="measured")
    ids = [set(re.findall(r'<pattern id="([^"]+)"', s)) for s in (a, b)]
    assert ids[0] and not ids[0] & ids[1]
