"""A picture of the model's modules, coloured by stage, with the boundary tensors.

Phase: report (reads :class:`~pipec.plan.PlanData` and the traced graph, draws SVG). The model is a
horizontal band of module blocks in topological order; a block is a run of
consecutive nodes of one stage under one module path, and its width is its
share of the compute time (forward + backward), so a heavy stage looks
heavy. Module paths are grouped at the finest depth that keeps the band
legible: starting from the top-level modules, the heaviest group is split
into its children while the band stays under :data:`MAX_BLOCKS` blocks.

Each boundary tensor is an arc from its producer node to the first node that
reads it in each consumer stage, labelled with its shape and size and drawn
thicker for bigger tensors; a skip connection (to a stage other than the
next) is a dashed long arc. Module paths come from the traced graph; a plan
loaded from disk has none, and then each stage is one block named
``first_module … last_module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipec.plan import Boundary, PlanData, StageInfo
from pipec.types import TracedGraph
from pipec.viz.palette import INK, MUTED_INK, PAPER, stage_colour
from pipec.viz.report_fmt import (
    esc,
    fit_text,
    fmt_bytes,
    fmt_count,
    fmt_shape,
    fmt_time,
    module_span,
    text_width,
)
from pipec.viz.report_layout import Arc, assign_levels, text_color

MAX_BLOCKS = 36
WIDTH = 1200.0
_MARGIN = 16.0
_BAND_H = 64.0
_MIN_W = 6.0
_GAP = 1.5
_STAGE_GAP = 8.0
_ARC_BASE = 26.0
_ARC_STEP = 24.0
_MIN_SPAN = 44.0
_MAX_LABEL_LEVELS = 10

Path = tuple[str, ...]


@dataclass
class _Block:
    stage: int
    key: Path
    nodes: list[str] = field(default_factory=list)
    label: str = ""
    weight: float = 0.0
    x: float = 0.0
    w: float = 0.0


def _runs(order: list[tuple[str, int]], paths: dict[str, Path], cut: set[Path]) -> list[_Block]:
    """Consecutive nodes of one stage under one cut prefix; top-level ops join a neighbour."""
    blocks: list[_Block] = []
    for node, stage in order:
        path = paths.get(node, ())
        key = next(path[:d] for d in range(len(path), -1, -1) if path[:d] in cut)
        last = blocks[-1] if blocks and blocks[-1].stage == stage else None
        if last is not None and (key == last.key or key == ()):
            last.nodes.append(node)
        elif last is not None and last.key == ():
            last.key = key  # a run of top-level ops adopts the module that follows it
            last.nodes.append(node)
        else:
            blocks.append(_Block(stage, key, [node]))
    return blocks


def _pattern(key: Path) -> Path:
    """``h.3`` and ``h.7`` are the same kind of module: refine them together."""
    return tuple("#" if part.isdigit() else part for part in key)


def _group(order: list[tuple[str, int]], paths: dict[str, Path], weight: dict[str, float]) -> list[_Block]:
    """Greedy refinement of the module grouping (see the module docstring).

    Prefixes of one pattern (``transformer.h.#``) are split all at once, so
    the twelve layers of a transformer show at the same depth or not at all.
    """
    cut: set[Path] = {()}
    frozen: set[Path] = set()
    blocks = _runs(order, paths, cut)
    while True:
        load: dict[Path, float] = {}
        for node, _stage in order:
            path = paths.get(node, ())
            key = next(path[:d] for d in range(len(path), -1, -1) if path[:d] in cut)
            if len(path) > len(key) and _pattern(key) not in frozen:
                load[_pattern(key)] = load.get(_pattern(key), 0.0) + weight[node]
        if not load:
            return blocks
        best = max(load, key=lambda p: (load[p], -len(p)))
        depth = len(best) + 1
        children = {
            paths[n][:depth] for n, _ in order if len(paths.get(n, ())) >= depth and _pattern(paths[n][: depth - 1]) == best
        }
        trial = _runs(order, paths, cut | children)
        if len(trial) <= MAX_BLOCKS:
            cut |= children
            blocks = trial
        frozen.add(best)


def _fallback(stages: list[StageInfo]) -> list[_Block]:
    blocks = []
    for st in stages:
        label = module_span(st.first_module, st.last_module)
        blocks.append(_Block(st.index, (), list(st.nodes), label or f"stage {st.index}"))
    return blocks


def _short_name(key: Path) -> str:
    """The shortest tail of a module path that names something: ``h.3``, ``down.0.2``."""
    for d in range(1, len(key) + 1):
        if not key[-d].isdigit():
            return ".".join(key[-d:])
    return ".".join(key)


def _label(key: Path) -> str:
    return ".".join(key) if key else "(top level)"


def _layout(blocks: list[_Block], weight: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Give every block its x and width, and every node its span within its block."""
    for b in blocks:
        b.weight = sum(weight.get(n, 0.0) for n in b.nodes)
    gaps = sum(_STAGE_GAP if a.stage != b.stage else _GAP for a, b in zip(blocks, blocks[1:]))
    free = max(0.0, WIDTH - 2 * _MARGIN - gaps - _MIN_W * len(blocks))
    total = sum(b.weight for b in blocks) or 1.0
    spans: dict[str, tuple[float, float]] = {}
    x = _MARGIN
    for i, b in enumerate(blocks):
        if i:
            x += _STAGE_GAP if blocks[i - 1].stage != b.stage else _GAP
        b.x, b.w = x, _MIN_W + free * b.weight / total
        nx = b.x
        for n in b.nodes:
            nw = b.w * (weight.get(n, 0.0) / b.weight if b.weight else 1 / len(b.nodes))
            spans[n] = (nx, nx + nw)
            nx += nw
        x += b.w
    return spans


def _block_svg(b: _Block, y: float, stage_time: dict[str, float]) -> str:
    color = stage_colour(b.stage)
    ink = text_color(color)
    name = b.label or _label(b.key)
    tip = (
        f"{name}\nstage {b.stage} \u00b7 {len(b.nodes)} nodes \u00b7 "
        f"{fmt_time(sum(stage_time.get(n, 0.0) for n in b.nodes))} fwd+bwd per micro-batch"
    )
    parts = [
        f'<g data-stage="{b.stage}"><title>{esc(tip)}</title>',
        f'<rect x="{b.x:.1f}" y="{y:.1f}" width="{b.w:.1f}" height="{_BAND_H:.0f}" rx="3" fill="{color}"/>',
    ]
    short = _short_name(b.key) if b.key else name
    cx = b.x + b.w / 2
    if text_width(name) <= b.w - 6 or text_width(short) <= b.w - 6:
        label = name if text_width(name) <= b.w - 6 else short
        parts.append(
            f'<text x="{cx:.1f}" y="{y + _BAND_H / 2 + 4:.1f}" text-anchor="middle" '
            f'fill="{ink}" font-size="11">{esc(label)}</text>'
        )
    elif b.w >= 12:  # a narrow block: its name runs vertically
        parts.append(
            f'<text transform="translate({cx + 4:.1f},{y + _BAND_H - 5:.1f}) rotate(-90)" '
            f'fill="{ink}" font-size="11">{esc(fit_text(short, _BAND_H - 10))}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


def _arcs(
    data: PlanData, traced: TracedGraph | None, spans: dict[str, tuple[float, float]], blocks: list[_Block]
) -> list[Arc]:
    stage_x: dict[int, tuple[float, float]] = {}
    for b in blocks:
        lo, hi = stage_x.get(b.stage, (b.x, b.x + b.w))
        stage_x[b.stage] = (min(lo, b.x), max(hi, b.x + b.w))
    users: dict[str, tuple[str, ...]] = {}
    if traced is not None:
        users = {n.name: n.users for n in traced.nodes}
    stage_of = {n: st.index for st in data.stages for n in st.nodes}
    arcs = []
    for bd in data.boundaries:
        x1 = spans[bd.name][1] if bd.name in spans else stage_x.get(bd.producer_stage, (0.0, _MARGIN))[1]
        for c in bd.consumer_stages:
            readers = [spans[u][0] for u in users.get(bd.name, ()) if stage_of.get(u) == c and u in spans]
            x2 = min(readers) if readers else stage_x.get(c, (WIDTH - _MARGIN, 0.0))[0]
            arcs.append(Arc(x1, x2, _arc_label(bd), bd, c))
    return arcs


def _arc_label(bd: Boundary) -> str:
    return f"{fmt_shape(bd.shape)} \u00b7 {fmt_bytes(bd.num_bytes)}"


def _arc_svg(arc: Arc, level: int, y0: float, max_bytes: int) -> str:
    bd = arc.boundary
    h = _ARC_BASE + level * _ARC_STEP
    color = stage_colour(bd.producer_stage)
    skip = arc.consumer - bd.producer_stage > 1
    thick = 1.2 + 2.8 * math.log1p(bd.num_bytes) / math.log1p(max(max_bytes, 1))
    x1, x2 = arc.x1, arc.x2
    if x2 - x1 < _MIN_SPAN:  # a short hop would be a narrow loop: widen it into both blocks
        mid = (x1 + x2) / 2
        x1, x2 = mid - _MIN_SPAN / 2, mid + _MIN_SPAN / 2
    tip = (
        f"{bd.name}: stage {bd.producer_stage} \u2192 stage {arc.consumer}"
        f"{' (skip connection)' if skip else ''}\n{fmt_shape(bd.shape)} {bd.dtype}, "
        f"{fmt_bytes(bd.num_bytes)} ({bd.num_bytes:,} bytes) per micro-batch"
    )
    dash = ' stroke-dasharray="6 4"' if skip else ""
    parts = [
        f'<g data-stage="{bd.producer_stage}"><title>{esc(tip)}</title>',
        f'<path d="M{x1:.1f},{y0:.1f} C{x1:.1f},{y0 - h:.1f} {x2:.1f},{y0 - h:.1f} {x2:.1f},{y0 - 1:.1f}" '
        f'fill="none" stroke="{color}" stroke-width="{thick:.1f}"{dash} '
        f'marker-end="url(#pcm-arrow-{bd.producer_stage})"/>',
    ]
    if level < _MAX_LABEL_LEVELS:
        cx, cy, tw = (x1 + x2) / 2, y0 - 0.75 * h, text_width(arc.label) + 6
        parts.append(
            f'<rect x="{cx - tw / 2:.1f}" y="{cy - 8:.1f}" width="{tw:.1f}" height="15" rx="3" '
            f'fill="{PAPER}" fill-opacity="0.92"/>'
            f'<text x="{cx:.1f}" y="{cy + 4:.1f}" text-anchor="middle" font-size="11" fill="{INK}">'
            f"{esc(arc.label)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def _stage_bracket(data: PlanData, stage: StageInfo, lo: float, hi: float, y: float) -> str:
    color = stage_colour(stage.index)
    title = f"stage {stage.index} \u00b7 rank {stage.rank}"
    detail = f"{fmt_time(stage.forward_time + stage.backward_time)} \u00b7 {fmt_count(stage.num_params)} params"
    tip = (
        f"{title}\nforward {fmt_time(stage.forward_time)}, backward {fmt_time(stage.backward_time)}, "
        f"comm {fmt_time(stage.comm_time)} per micro-batch\n{stage.num_params:,} parameters, "
        f"memory {fmt_bytes(stage.memory_bytes)}\n{module_span(stage.first_module, stage.last_module)}"
    )
    width = hi - lo
    return (
        f'<g data-stage="{stage.index}"><title>{esc(tip)}</title>'
        f'<path d="M{lo:.1f},{y:.1f} v6 H{hi:.1f} v-6" fill="none" stroke="{color}" stroke-width="2"/>'
        f'<text x="{(lo + hi) / 2:.1f}" y="{y + 21:.1f}" text-anchor="middle" font-size="12" '
        f'font-weight="600" fill="{INK}">{esc(fit_text(title, width))}</text>'
        f'<text x="{(lo + hi) / 2:.1f}" y="{y + 36:.1f}" text-anchor="middle" font-size="11" '
        f'fill="{MUTED_INK}">{esc(fit_text(detail, width))}</text></g>'
    )


def modules_svg(data: PlanData, traced: TracedGraph | None = None) -> str:
    """The model as a band of module blocks coloured by stage, with boundary arcs."""
    stages = list(data.stages)
    order = [(n, st.index) for st in stages for n in st.nodes]
    costs = data.node_costs
    raw = {n: (costs[n].total_time if n in costs else 0.0) for n, _ in order}
    mean = (sum(raw.values()) / len(raw)) if raw else 0.0
    weight = {n: t + 0.05 * mean if mean > 0 else 1.0 for n, t in raw.items()}
    if traced is not None:
        paths = {n.name: tuple(p for p in n.module_path.split(".") if p) for n in traced.nodes}
        blocks = _group(order, paths, weight)
    elif data.node_modules:
        paths = {n: tuple(p for p in m.split(".") if p) for n, m in data.node_modules.items()}
        blocks = _group(order, paths, weight)
    else:
        blocks = _fallback(stages)
    blocks = [b for b in blocks if b.nodes] or _fallback(stages)
    spans = _layout(blocks, weight)
    arcs = _arcs(data, traced, spans, blocks)
    levels = assign_levels(arcs)
    top = _ARC_BASE + (max(levels, default=-1) + 1) * _ARC_STEP + 14
    y_band = top
    height = y_band + _BAND_H + 48
    max_bytes = max((a.boundary.num_bytes for a in arcs), default=1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH:.0f} {height:.0f}" '
        f'width="{WIDTH:.0f}" height="{height:.0f}" font-family="system-ui, sans-serif" '
        f'role="img" aria-label="model modules coloured by stage">',
        "<defs>",
    ]
    for st in stages:
        out.append(
            f'<marker id="pcm-arrow-{st.index}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" markerUnits="userSpaceOnUse" orient="auto">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{stage_colour(st.index)}"/></marker>'
        )
    out.append("</defs>")
    out.extend(_block_svg(b, y_band, raw) for b in blocks)
    for arc, level in sorted(zip(arcs, levels), key=lambda p: -p[1]):
        out.append(_arc_svg(arc, level, y_band, max_bytes))
    for st in stages:
        xs = [(b.x, b.x + b.w) for b in blocks if b.stage == st.index]
        if xs:
            out.append(_stage_bracket(data, st, min(x for x, _ in xs), max(x for _, x in xs), y_band + _BAND_H + 4))
    out.append("</svg>")
    return "".join(out)
