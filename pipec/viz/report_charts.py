"""Small bar charts of the report: memory per rank against its limit, and the
auto-planner's candidates by simulated step time.

Each function takes plain numbers and returns one ``<svg>`` string with a
``<title>`` tooltip on every bar giving the exact values.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.plan import Candidate
from pipec.viz.palette import (
    AXIS,
    BAD,
    BAD_BACKGROUND,
    GOOD,
    INK,
    MUTED_INK,
    NEUTRAL,
    TRACK,
    rank_colour,
    stage_colour,
)
from pipec.viz.report_fmt import esc, fit_text, fmt_bytes, fmt_pct, fmt_time

_WIDTH = 560.0
_LABEL_W = 150.0
_VALUE_W = 150.0
_ROW_H = 26.0
_BAR_H = 16.0


def _svg_open(width: float, height: float, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" font-family="system-ui, sans-serif" '
        f'font-size="12" role="img" aria-label="{esc(label)}">'
    )


def memory_bars_svg(
    peak: Sequence[int],
    limit: Sequence[int | None],
    rank_stages: Sequence[Sequence[int]],
) -> str:
    """Peak memory per rank as horizontal bars, each against its rank's limit.

    A bar takes the colour of the rank's (first) stage and turns red past the
    limit; the limit is a dark tick. ``limit[r]`` None means no known limit.
    """
    known = [x for x in limit if x]
    scale = max([*peak, *known, 1]) * 1.04
    plot_w = _WIDTH - _LABEL_W - _VALUE_W
    height = _ROW_H * len(peak) + 8
    out = [_svg_open(_WIDTH, height, "peak memory per rank against the limit")]
    for r, used in enumerate(peak):
        cap = limit[r] if r < len(limit) else None
        stages = rank_stages[r] if r < len(rank_stages) else ()
        over = cap is not None and used > cap
        y = 4 + r * _ROW_H
        color = BAD if over else (stage_colour(stages[0]) if stages else rank_colour(r))
        w = plot_w * used / scale
        names = ", ".join(str(s) for s in stages)
        tip = f"rank {r} (stage {names}): peak {fmt_bytes(used)} ({used:,} bytes)"
        tip += f" of {fmt_bytes(cap)} ({fmt_pct(used / cap)})" if cap else ", no memory limit"
        value = f"{fmt_bytes(used)} / {fmt_bytes(cap)}" if cap else fmt_bytes(used)
        out.append(f"<g><title>{esc(tip)}</title>")
        out.append(f'<text x="0" y="{y + 13:.1f}" fill="{INK}">rank {r}</text>')
        out.append(
            f'<rect x="{_LABEL_W:.0f}" y="{y:.1f}" width="{plot_w:.1f}" height="{_BAR_H:.0f}" rx="3" fill="{TRACK}"/>'
        )
        out.append(
            f'<rect x="{_LABEL_W:.0f}" y="{y:.1f}" width="{max(w, 1.5):.1f}" height="{_BAR_H:.0f}" rx="3" fill="{color}"/>'
        )
        if cap:
            cx = _LABEL_W + plot_w * cap / scale
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y - 3:.1f}" y2="{y + _BAR_H + 3:.1f}" '
                f'stroke="{AXIS}" stroke-width="2"/>'
            )
        out.append(
            f'<text x="{_WIDTH - _VALUE_W + 8:.0f}" y="{y + 13:.1f}" fill="{BAD if over else MUTED_INK}">'
            f"{esc(value)}</text></g>"
        )
    out.append("</svg>")
    return "".join(out)


def time_bars_svg(rows: Sequence[tuple[str, float, str]], *, reference: float | None = None) -> str:
    """Horizontal bars of times, ``(label, seconds, colour)`` per row; an
    optional dashed ``reference`` line (the lower bound)."""
    scale = max([t for _, t, _ in rows] + [reference or 0.0, 1e-12]) * 1.04
    plot_w = _WIDTH - _LABEL_W - _VALUE_W
    height = _ROW_H * len(rows) + 8
    out = [_svg_open(_WIDTH, height, "times")]
    for i, (label, seconds, color) in enumerate(rows):
        y = 4 + i * _ROW_H
        out.append(f"<g><title>{esc(label)}: {esc(fmt_time(seconds))} ({seconds:.6g} s)</title>")
        out.append(f'<text x="0" y="{y + 13:.1f}" fill="{INK}">{esc(fit_text(label, _LABEL_W - 6))}</text>')
        out.append(
            f'<rect x="{_LABEL_W:.0f}" y="{y:.1f}" width="{max(plot_w * seconds / scale, 1.5):.1f}" '
            f'height="{_BAR_H:.0f}" rx="3" fill="{color}"/>'
        )
        out.append(
            f'<text x="{_WIDTH - _VALUE_W + 8:.0f}" y="{y + 13:.1f}" fill="{MUTED_INK}">{esc(fmt_time(seconds))}</text></g>'
        )
    if reference:
        x = _LABEL_W + plot_w * reference / scale
        out.append(
            f'<g><title>lower bound {esc(fmt_time(reference))}</title><line x1="{x:.1f}" x2="{x:.1f}" y1="0" '
            f'y2="{height:.0f}" stroke="{AXIS}" stroke-width="1.5" stroke-dasharray="4 3"/></g>'
        )
    out.append("</svg>")
    return "".join(out)


def candidate_label(c: Candidate) -> str:
    label = f"{c.schedule} \u00b7 m={c.num_microbatches}"
    label += f" \u00b7 v={c.stages_per_rank}" if c.stages_per_rank != 1 else ""
    if c.num_ranks:  # a data-parallel search's: D x P and the mesh order
        label = f"D={c.data_parallel} \u00d7 P={c.num_ranks} \u00b7 " + label
        times = "\u00d7"
        label += f" \u00b7 {times.join(c.mesh_order)}" if c.data_parallel > 1 and c.num_ranks > 1 else ""
    return label


def candidates_svg(candidates: Sequence[Candidate], winner: int | None) -> str:
    """The candidates' simulated step times, fastest first; the chosen one
    marked with a star, the ones that do not fit in memory hatched red."""
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].step_time)
    width = 760.0
    label_w, value_w = 230.0, 190.0
    plot_w = width - label_w - value_w
    scale = max([c.step_time for c in candidates] + [1e-12]) * 1.04
    height = _ROW_H * len(order) + 8
    out = [
        _svg_open(width, height, "auto-planner candidates by simulated step time"),
        '<defs><pattern id="pcc-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{BAD_BACKGROUND}"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{BAD}" stroke-width="2"/></pattern></defs>',
    ]
    for row, i in enumerate(order):
        c = candidates[i]
        y = 4 + row * _ROW_H
        chosen = i == winner
        fill = "url(#pcc-hatch)" if not c.fits else (GOOD if chosen else NEUTRAL)
        mark = "\u2605 " if chosen else ("\u2717 " if not c.fits else "")
        status = "chosen" if chosen else ("does not fit in memory" if not c.fits else "fits")
        peak = max(c.peak_memory, default=0)
        tip = (
            f"{candidate_label(c)}: step {fmt_time(c.step_time)} ({c.step_time:.6g} s), "
            f"bubble {fmt_pct(c.bubble_fraction)}, peak memory {fmt_bytes(peak)}; {status}"
            + (f"\n{c.note}" if c.note else "")
        )
        weight = ' font-weight="700"' if chosen else ""
        out.append(f"<g><title>{esc(tip)}</title>")
        out.append(
            f'<text x="0" y="{y + 13:.1f}" fill="{INK}"{weight}>{esc(mark + fit_text(candidate_label(c), label_w - 20))}</text>'
        )
        out.append(
            f'<rect x="{label_w:.0f}" y="{y:.1f}" width="{max(plot_w * c.step_time / scale, 1.5):.1f}" '
            f'height="{_BAR_H:.0f}" rx="3" fill="{fill}" stroke="{BAD if not c.fits else "none"}"/>'
        )
        value = f"{fmt_time(c.step_time)} \u00b7 bubble {fmt_pct(c.bubble_fraction)}"
        out.append(
            f'<text x="{width - value_w + 8:.0f}" y="{y + 13:.1f}" fill="{MUTED_INK}"{weight}>{esc(value)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)
