"""SVG pictures of a simulated (or measured) step: a Gantt chart and memory over time.

Phase: viz (pure functions, no I/O, no matplotlib). Input: a
:class:`~pipec.schedule.simulator.Simulation` (or, for the Gantt chart, a bare
:class:`~pipec.schedule.ir.Schedule`, drawn from a simulation with F = I = W = 1
and B = 2). Output: an SVG document as a string.

The Gantt chart has one row per rank and time across; boxes are coloured by
kind (F, B, I, W), carry the micro-batch number and fade with the chunk for
interleaved schedules; bubbles are the empty space; the time a rank waits in a
RECV is a thin grey bar. The memory chart draws each rank's activation bytes as
a step function over the step.
"""

from __future__ import annotations

from collections.abc import Callable
from xml.sax.saxutils import escape

from pipec.schedule.ir import ActionKind, Schedule
from pipec.schedule.simulator import Simulation, simulate
from pipec.units import format_bytes, format_seconds

KIND_COLOUR: dict[ActionKind, str] = {
    ActionKind.F: "#4e79a7",
    ActionKind.B: "#59a14f",
    ActionKind.I: "#76b7b2",
    ActionKind.W: "#b07aa1",
}
WAIT_COLOUR = "#9d9d9d"
RANK_COLOURS = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
)
_FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _document(width: float, height: float, body: list[str]) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" {_FONT} font-size="11">\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def _ticks(x0: float, x1: float, y: float, end: float, label: Callable[[float], str]) -> list[str]:
    out = [f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="#333"/>']
    for k in range(5):
        t = end * k / 4
        x = x0 + (x1 - x0) * k / 4
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" stroke="#333"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y + 15:.1f}" text-anchor="middle">{escape(label(t))}</text>'
        )
    return out


def _as_simulation(value: Simulation | Schedule) -> tuple[Simulation, Callable[[float], str]]:
    if isinstance(value, Schedule):
        sim = simulate(value.compute_only(), forward=1.0, input_grad=1.0, weight_grad=1.0)
        return sim, lambda t: f"{t:g}"
    return value, format_seconds


def schedule_svg(
    simulation: Simulation | Schedule,
    *,
    width: int = 960,
    row_height: int = 26,
    title: str | None = None,
) -> str:
    """A Gantt chart of ``simulation``: ranks down, time across (SVG text)."""
    sim, label = _as_simulation(simulation)
    schedule = sim.schedule
    left, right, top = 64.0, 16.0, 44.0
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
    for i, kind in enumerate(kinds):
        lx = left + 70 * i
        body.append(
            f'<rect x="{lx:.0f}" y="24" width="12" height="12" fill="{KIND_COLOUR[kind]}"/>'
        )
        body.append(f'<text x="{lx + 16:.0f}" y="34">{kind.value}</text>')
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
                    f'fill="{WAIT_COLOUR}"><title>{a} waits {escape(label(e.end - e.start))}</title></rect>'
                )
            continue
        chunk = a.stage // max(1, sim.num_ranks)
        opacity = 1.0 - 0.45 * chunk / (chunks - 1) if chunks > 1 else 1.0
        tip = f"{a} on rank {e.rank}: {label(e.start)} - {label(e.end)}"
        body.append(
            f'<rect x="{x0:.2f}" y="{y + 2:.1f}" width="{max(x1 - x0, 0.5):.2f}" '
            f'height="{row_height - 8}" fill="{KIND_COLOUR[a.kind]}" fill-opacity="{opacity:.2f}" '
            f'stroke="white" stroke-width="0.5"><title>{escape(tip)}</title></rect>'
        )
        if x1 - x0 >= 9:
            body.append(
                f'<text x="{(x0 + x1) / 2:.2f}" y="{y + row_height / 2 + 2:.1f}" fill="white" '
                f'text-anchor="middle" font-size="10">{a.microbatch}</text>'
            )
    body += _ticks(left, left + plot, top + row_height * sim.num_ranks + 4, sim.step_time, label)
    return _document(width, height, body)


def memory_svg(
    simulation: Simulation, *, width: int = 960, height: int = 300, title: str | None = None
) -> str:
    """Activation memory per rank over the step, as step functions (SVG text)."""
    sim = simulation
    left, right, top, bottom = 80.0, 16.0, 40.0, 34.0
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
            f'stroke="#ddd"/><text x="{left - 6:.0f}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{escape(format_bytes(value))}</text>"
        )
    if not any(sim.peak_memory):
        body.append(
            f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
            'fill="#666">no activation bytes given</text>'
        )
    for r, points in enumerate(sim.memory):
        colour = RANK_COLOURS[r % len(RANK_COLOURS)]
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
