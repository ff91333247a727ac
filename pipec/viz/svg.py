"""SVG pictures of a simulated (or measured) step: a Gantt chart and memory over time.

Phase: viz (pure functions, no I/O, no matplotlib). Input: a
:class:`~pipec.schedule.simulator.Simulation` (or, for the Gantt chart, a bare
:class:`~pipec.schedule.ir.Schedule`, drawn from a simulation with F = I = W = 1
and B = 2). Output: an SVG document as a string.

The Gantt chart has one row per rank and time across; each box carries the
micro-batch number and ``data-stage``/``data-kind``/``data-mb`` attributes
(the report's hover highlight finds a stage by them); bubbles are the empty
space; the time a rank waits in a RECV is a thin grey bar. Boxes are coloured
either by kind (F, B, I, W; fading with the chunk for interleaved schedules)
or, as in the report, by stage with the kind as shade (see
:mod:`pipec.viz.palette`). The memory chart draws each rank's activation bytes
as a step function over the step, in the rank's colour.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal
from xml.sax.saxutils import escape

from pipec.schedule.ir import ActionKind, Schedule
from pipec.schedule.simulator import Simulation, TimelineEvent, simulate
from pipec.units import format_bytes, format_seconds
from pipec.viz import palette

ColourBy = Literal["kind", "stage"]
KIND_COLOUR: dict[ActionKind, str] = {ActionKind(k): c for k, c in palette.KIND_COLOURS.items()}
WAIT_COLOUR = palette.COMM_COLOUR
RANK_COLOURS = palette.STAGE_COLOURS  # rank r is coloured as its first stage, stage r
GANTT_LEFT = 64.0
GANTT_RIGHT = 40.0  # room for half of the last time label, centred on the chart's end
GANTT_MARGINS = GANTT_LEFT + GANTT_RIGHT
_FONT = 'font-family="Helvetica, Arial, sans-serif"'
_CHAR_W = 6.2  # rough width of one 11 px character, for laying out the legend


def _document(width: float, height: float, body: list[str]) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" {_FONT} font-size="11">\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def _ticks(x0: float, x1: float, y: float, end: float, label: Callable[[float], str]) -> list[str]:
    out = [f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{palette.AXIS}"/>']
    for k in range(5):
        t = end * k / 4
        x = x0 + (x1 - x0) * k / 4
        out.append(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" stroke="{palette.AXIS}"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{y + 15:.1f}" text-anchor="middle">{escape(label(t))}</text>'
        )
    return out


def _as_simulation(value: Simulation | Schedule) -> tuple[Simulation, Callable[[float], str]]:
    if isinstance(value, Schedule):
        sim = simulate(value.compute_only(), forward=1.0, input_grad=1.0, weight_grad=1.0)
        return sim, lambda t: f"{t:g}"
    return value, format_seconds


def _legend_item(x: float, swatch: str, text: str, attrs: str = "") -> tuple[str, float]:
    """One legend entry at ``x``: a 12 px swatch (its fill given) and a label."""
    item = (
        f'<g{attrs}><rect x="{x:.0f}" y="24" width="12" height="12" {swatch}/>'
        f'<text x="{x + 16:.0f}" y="34">{escape(text)}</text></g>'
    )
    return item, x + 16 + _CHAR_W * len(text) + 14


def _hatch_id(prefix: str, stage: int) -> str:
    return f"{prefix}-w{stage}"


def _hatch_defs(prefix: str, stages: list[int]) -> str:
    """One diagonal-hatch pattern per stage with W actions: stage colour on its tint."""
    patterns = "".join(
        f'<pattern id="{_hatch_id(prefix, s)}" width="5" height="5" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="5" height="5" fill="{palette.kind_fill(s, "W")}"/>'
        f'<line x1="0" y1="0" x2="0" y2="5" stroke="{palette.stage_colour(s)}" stroke-width="2"/></pattern>'
        for s in stages
    )
    return f"<defs>{patterns}</defs>" if patterns else ""


def _stage_legend(kinds: list[ActionKind], stages: list[int], prefix: str, x: float) -> list[str]:
    """Legend of a chart coloured by stage: the kinds as shades of the first
    stage's colour, then one swatch per stage (hovering one highlights it)."""
    out = [f'<text x="{x:.0f}" y="34">shade = kind:</text>']
    x += _CHAR_W * 13 + 8
    first = stages[0] if stages else 0
    for kind in kinds:
        fill = (
            f"url(#{_hatch_id(prefix, first)})"
            if palette.is_hatched(kind.value)
            else palette.kind_fill(first, kind.value)
        )
        item, x = _legend_item(
            x, f'fill="{fill}"', f"{kind.value} {palette.KIND_SHADE[kind.value]}"
        )
        out.append(item)
    out.append(f'<text x="{x:.0f}" y="34">colour = stage:</text>')
    x += _CHAR_W * 15 + 8
    for s in stages:
        item, x = _legend_item(x, f'fill="{palette.stage_colour(s)}"', str(s), f' data-stage="{s}"')
        out.append(item)
    return out


def _box(
    e: TimelineEvent,
    x0: float,
    x1: float,
    y: float,
    row_height: int,
    fill: str,
    opacity: float,
    ink: str,
    tip: str,
) -> str:
    """One compute action: a box with its tooltip and micro-batch number, in a
    group carrying the stage, kind and micro-batch for the report's script."""
    a = e.action
    text = ""
    if x1 - x0 >= 9:
        text = (
            f'<text x="{(x0 + x1) / 2:.2f}" y="{y + row_height / 2 + 2:.1f}" fill="{ink}" '
            f'text-anchor="middle" font-size="10" pointer-events="none">{a.microbatch}</text>'
        )
    return (
        f'<g data-stage="{a.stage}" data-kind="{a.kind.value}" data-mb="{a.microbatch}">'
        f'<rect x="{x0:.2f}" y="{y + 2:.1f}" width="{max(x1 - x0, 0.5):.2f}" '
        f'height="{row_height - 8}" fill="{fill}" fill-opacity="{opacity:.2f}" '
        f'stroke="white" stroke-width="0.5"><title>{escape(tip)}</title></rect>{text}</g>'
    )


def schedule_svg(
    simulation: Simulation | Schedule,
    *,
    width: int = 960,
    row_height: int = 26,
    title: str | None = None,
    colour_by: ColourBy = "kind",
    id_prefix: str | None = None,
) -> str:
    """A Gantt chart of ``simulation``: ranks down, time across (SVG text).

    ``colour_by="kind"`` fills a box by its kind (F, B, I, W); ``"stage"``
    fills it with its stage's colour, solid for forward and a light tint for
    backward, W hatched (:mod:`pipec.viz.palette`), as every other picture of
    the report colours stages. ``id_prefix`` starts the ids the chart defines
    (its hatch patterns): give each chart inlined in one page its own; by
    default it is derived from the chart's content.
    """
    if colour_by not in ("kind", "stage"):
        raise ValueError(f"colour_by must be 'kind' or 'stage', got {colour_by!r}")
    sim, label = _as_simulation(simulation)
    schedule = sim.schedule
    left, right, top = GANTT_LEFT, GANTT_RIGHT, 44.0
    plot = width - left - right
    end = sim.step_time if sim.step_time > 0 else 1.0
    height = top + row_height * sim.num_ranks + 34

    def x(t: float) -> float:
        return left + plot * t / end

    heading = title or (
        f"{schedule.name}: {schedule.num_stages} stages, {schedule.num_microbatches} micro-batches"
        f" - step {label(sim.step_time)}, bubble {sim.bubble_fraction:.1%}"
    )
    body = [
        f'<text x="{left:.0f}" y="16" font-size="13" font-weight="bold">{escape(heading)}</text>'
    ]
    kinds = [k for k in KIND_COLOUR if any(e.action.kind is k for e in sim.timeline)]
    stages = sorted({e.action.stage for e in sim.timeline if e.action.kind.is_compute})
    if id_prefix is None:
        key = f"{heading}|{width}|{row_height}|{sim.step_time!r}|{len(sim.timeline)}"
        id_prefix = "pg" + hashlib.sha1(key.encode()).hexdigest()[:8]
    prefix = id_prefix
    if colour_by == "stage":
        hatched = [
            s
            for s in stages
            if any(e.action.stage == s and e.action.kind is ActionKind.W for e in sim.timeline)
        ]
        if any(palette.is_hatched(k.value) for k in kinds) and stages and stages[0] not in hatched:
            hatched.insert(0, stages[0])  # the legend's W swatch uses the first stage's pattern
        body.append(_hatch_defs(prefix, hatched))
        body += _stage_legend(kinds, stages, prefix, left)
    else:
        lx = left
        for kind in kinds:
            item, _ = _legend_item(lx, f'fill="{KIND_COLOUR[kind]}"', kind.value)
            body.append(item)
            lx += 70
    for r in range(sim.num_ranks):
        y = top + r * row_height
        body.append(
            f'<text x="{left - 8:.0f}" y="{y + row_height / 2 + 4:.1f}" text-anchor="end">rank {r}</text>'
        )
    chunks = max(1, schedule.stages_per_rank)
    for e in sim.timeline:
        a = e.action
        y = top + e.rank * row_height
        x0, x1 = x(e.start), x(e.end)
        if a.kind not in KIND_COLOUR:
            if e.end > e.start:
                body.append(
                    f'<rect x="{x0:.2f}" y="{y + row_height - 5:.1f}" width="{x1 - x0:.2f}" height="2" '
                    f'fill="{WAIT_COLOUR}" data-stage="{a.stage}" data-kind="{a.kind.value}" '
                    f'data-mb="{a.microbatch}"><title>{a} waits {escape(label(e.end - e.start))}</title></rect>'
                )
            continue
        tip = f"{a} on rank {e.rank}: {label(e.start)} - {label(e.end)}"
        if colour_by == "stage":
            shade = palette.kind_fill(a.stage, a.kind.value)
            fill = (
                f"url(#{_hatch_id(prefix, a.stage)})" if palette.is_hatched(a.kind.value) else shade
            )
            body.append(_box(e, x0, x1, y, row_height, fill, 1.0, palette.ink_on(shade), tip))
        else:
            chunk = a.stage // max(1, sim.num_ranks)
            opacity = 1.0 - 0.45 * chunk / (chunks - 1) if chunks > 1 else 1.0
            body.append(
                _box(e, x0, x1, y, row_height, KIND_COLOUR[a.kind], opacity, palette.LIGHT_INK, tip)
            )
    for c in sim.collectives:
        x0, x1 = x(c.start), x(c.end)
        tip = f"{c.name} on ranks {', '.join(map(str, c.ranks))}: {label(c.start)} - {label(c.end)}"
        if c.name.startswith("dp all-reduce"):  # overlaps the rank's compute: a band under its row
            for r in c.ranks:
                y = top + r * row_height + row_height - 6
                body.append(
                    f'<g data-kind="dp-allreduce"><rect x="{x0:.2f}" y="{y:.1f}" width="{max(x1 - x0, 0.5):.2f}" '
                    f'height="4" fill="{palette.COMM_COLOUR}"><title>{escape(tip)}</title></rect></g>'
                )
            continue
        for r in c.ranks:
            y = top + r * row_height
            text = ""
            if x1 - x0 >= 70:
                text = (
                    f'<text x="{(x0 + x1) / 2:.2f}" y="{y + row_height / 2 + 2:.1f}" fill="{palette.ink_on(palette.COMM_COLOUR)}" '
                    f'text-anchor="middle" font-size="10" pointer-events="none">all-reduce</text>'
                )
            body.append(
                f'<g data-kind="collective"><rect x="{x0:.2f}" y="{y + 2:.1f}" width="{max(x1 - x0, 0.5):.2f}" '
                f'height="{row_height - 8}" fill="{palette.COMM_COLOUR}" stroke="white" stroke-width="0.5">'
                f"<title>{escape(tip)}</title></rect>{text}</g>"
            )
    body += _ticks(left, left + plot, top + row_height * sim.num_ranks + 4, sim.step_time, label)
    return _document(width, height, body)


def memory_svg(
    simulation: Simulation, *, width: int = 960, height: int = 300, title: str | None = None
) -> str:
    """Activation memory per rank over the step, as step functions (SVG text)."""
    sim = simulation
    left, right, top, bottom = 80.0, GANTT_RIGHT, 40.0, 34.0
    plot_w, plot_h = width - left - right, height - top - bottom
    end = sim.step_time if sim.step_time > 0 else 1.0
    peak = max(sim.peak_memory, default=0) or 1

    def x(t: float) -> float:
        return left + plot_w * min(t, end) / end

    def y(num_bytes: float) -> float:
        return top + plot_h * (1.0 - num_bytes / peak)

    heading = title or f"{sim.schedule.name}: activation memory per rank"
    body = [
        f'<text x="{left:.0f}" y="16" font-size="13" font-weight="bold">{escape(heading)}</text>'
    ]
    for k in range(3):
        value = peak * k / 2
        body.append(
            f'<line x1="{left:.0f}" y1="{y(value):.1f}" x2="{left + plot_w:.0f}" y2="{y(value):.1f}" '
            f'stroke="{palette.RULE}"/><text x="{left - 6:.0f}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{escape(format_bytes(value))}</text>"
        )
    if not any(sim.peak_memory):
        body.append(
            f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
            f'fill="{palette.MUTED_INK}">no activation bytes given</text>'
        )
    for r, points in enumerate(sim.memory):
        colour = palette.rank_colour(r)
        path = []
        last = 0
        for t, num_bytes in points:
            path.append(f"{x(t):.2f},{y(last):.2f} {x(t):.2f},{y(num_bytes):.2f}")
            last = num_bytes
        path.append(f"{x(end):.2f},{y(last):.2f}")
        peak_r = sim.peak_memory[r] if r < len(sim.peak_memory) else 0
        body.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(path)}">'
            f"<title>rank {r}: peak {escape(format_bytes(peak_r))}</title></polyline>"
        )
        lx = left + 130 * r
        body.append(f'<rect x="{lx:.0f}" y="24" width="12" height="3" fill="{colour}"/>')
        body.append(
            f'<text x="{lx + 16:.0f}" y="30">rank {r} ({escape(format_bytes(peak_r))})</text>'
        )
    body += _ticks(left, left + plot_w, top + plot_h, sim.step_time, format_seconds)
    return _document(width, height, body)
