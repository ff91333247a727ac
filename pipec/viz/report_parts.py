"""The sections of ``report.html`` that describe the plan itself: the plan at
a glance, the stage and boundary tables, and the auto-planner's candidates.

Each function returns an HTML fragment; every plan string is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipec.plan import Candidate, PlanData, StageInfo
from pipec.viz import palette
from pipec.viz.report_charts import candidate_label, candidates_svg, memory_bars_svg, time_bars_svg
from pipec.viz.report_fmt import esc, fmt_bytes, fmt_count, fmt_ms, fmt_pct, fmt_time, module_span


def card(key: str, value: str, detail: str = "", cls: str = "") -> str:
    if len(value) > 14:  # a long model name: smaller, rather than broken mid-word
        cls += " long"
    return (
        f'<div class="card {cls}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
        f'<div class="d">{esc(detail)}</div></div>'
    )


def swatch(stage: int) -> str:
    return f'<span class="sw" style="background:{palette.stage_colour(stage)}"></span>'


def rank_stages(data: PlanData) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(data.num_ranks)]
    for st in data.stages:
        if 0 <= st.rank < data.num_ranks:
            out[st.rank].append(st.index)
    return out


def rank_memory(data: PlanData) -> list[int]:
    """The plan's own memory estimate per rank (sum of its stages')."""
    out = [0] * data.num_ranks
    for st in data.stages:
        if 0 <= st.rank < data.num_ranks:
            out[st.rank] += st.memory_bytes
    return out


def bottleneck_stage(data: PlanData) -> int | None:
    if not data.stages:
        return None
    return max(data.stages, key=lambda s: s.time).index


def glance(
    data: PlanData,
    *,
    step_time: float | None,
    bubble: float | None,
    peak: Sequence[int],
) -> str:
    """Key figures as cards, then memory per rank and time per stage as bars."""
    limits = list(data.memory_limit) + [None] * (data.num_ranks - len(data.memory_limit))
    num_params = sum(st.num_params for st in data.stages)
    param_bytes = sum(st.param_bytes for st in data.stages)
    over = [r for r, used in enumerate(peak) if limits[r] is not None and used > (limits[r] or 0)]
    top = max(peak, default=0)
    top_rank = max(range(len(peak)), key=lambda r: peak[r]) if peak else 0
    gap = data.bottleneck / data.lower_bound - 1 if data.lower_bound > 0 else 0.0
    step_detail = ""
    if step_time and data.batch_size:
        step_detail = f"{data.batch_size / step_time:,.0f} samples/s at batch {data.batch_size}"
    top_limit = limits[top_rank] if peak else None
    limit_text = f"limit {fmt_bytes(top_limit)}" if top_limit else "no memory limit"
    cards = [
        card("model", data.model_name, f"traced with {data.trace_method}"),
        card("parameters", fmt_count(num_params), f"{fmt_bytes(param_bytes)} over all stages"),
        card(
            "stages",
            f"{data.num_stages} on {data.num_ranks} rank{'s' if data.num_ranks != 1 else ''}",
            f"{data.stages_per_rank} stage(s) per rank",
        ),
        card("schedule", data.schedule.name, f"{data.num_microbatches} micro-batches"),
        card("cost model", data.cost_model, f"strategy {data.strategy}"),
        card("predicted step", fmt_time(step_time) if step_time is not None else "n/a", step_detail, "hi"),
        card("bubble", fmt_pct(bubble) if bubble is not None else "n/a", "idle share of the ranks' time"),
        card(
            "bottleneck",
            fmt_time(data.bottleneck),
            f"compute-only lower bound {fmt_time(data.lower_bound)} ({gap * 100:+.1f}%)",
        ),
        card(
            "peak memory",
            fmt_bytes(top),
            f"rank {top_rank}, {limit_text}" + (f"; over on rank {', '.join(map(str, over))}" if over else ""),
            "bad" if over else "",
        ),
    ]
    time_rows = [
        (f"stage {st.index} (rank {st.rank})", st.time, palette.stage_colour(st.index)) for st in data.stages
    ]
    return (
        f'<div class="cards">{"".join(cards)}</div>'
        '<div class="row2"><div class="panel"><h3>Peak memory per rank</h3>'
        f"<figure>{memory_bars_svg(peak, limits, rank_stages(data))}</figure>"
        "<figcaption>Bar: the plan's peak memory per rank (parameters, gradients, optimizer state and "
        "the activations its schedule keeps in flight); black tick: the rank's memory limit.</figcaption></div>"
        '<div class="panel"><h3>Time per micro-batch by stage</h3>'
        f"<figure>{time_bars_svg(time_rows, reference=data.lower_bound)}</figure>"
        "<figcaption>Forward + backward + communication; dashed line: the lower bound "
        "(total compute / stages, or the largest node), which leaves communication out."
        "</figcaption></div></div>"
    )


def _time_bar(st: StageInfo, scale: float) -> str:
    """Forward, backward and communication time of a stage, shaded as the Gantt
    chart shades them: solid stage colour, its light tint, grey."""
    parts = [
        ("f", st.forward_time, "forward", palette.kind_fill(st.index, "F")),
        ("b", st.backward_time, "backward", palette.kind_fill(st.index, "B")),
        ("c", st.comm_time + st.tied_time, "comm", palette.COMM_COLOUR),
    ]
    spans = "".join(
        f'<span class="{cls}" style="width:{100 * t / scale:.2f}%;background:{colour}" '
        f'title="{name} {esc(fmt_time(t))}"></span>'
        for cls, t, name, colour in parts
        if t > 0
    )
    return f'<div class="tbar">{spans}</div>'


def stage_table(data: PlanData) -> str:
    scale = max((st.time for st in data.stages), default=0.0) or 1.0
    slow = bottleneck_stage(data)
    rows = []
    for st in data.stages:
        modules = module_span(st.first_module, st.last_module)
        tag = ' <span class="tag nofit">bottleneck</span>' if st.index == slow and data.num_stages > 1 else ""
        rows.append(
            f'<tr data-stage="{st.index}"><td data-v="{st.index}">{swatch(st.index)}{st.index}{tag}</td>'
            f'<td class="n">{st.rank}</td><td class="n">{len(st.nodes)}</td>'
            f'<td class="mono" title="{esc(modules)}">{esc(modules)}</td>'
            f'<td class="n" data-v="{st.num_params}" title="{st.num_params:,}">{fmt_count(st.num_params)}</td>'
            f'<td class="n" data-v="{st.forward_time}">{fmt_ms(st.forward_time)}</td>'
            f'<td class="n" data-v="{st.backward_time}">{fmt_ms(st.backward_time)}</td>'
            f'<td class="n" data-v="{st.comm_time + st.tied_time}">{fmt_ms(st.comm_time + st.tied_time)}</td>'
            f'<td data-v="{st.time}">{_time_bar(st, scale)}</td>'
            f'<td data-v="{esc(st.recompute)}" title="activation recompute policy">{esc(st.recompute)}</td>'
            f'<td class="n" data-v="{st.memory_bytes}" title="{st.memory_bytes:,} bytes">'
            f"{esc(fmt_bytes(st.memory_bytes))}</td></tr>"
        )
    head = (
        "<thead><tr><th>stage</th><th class=n>rank</th><th class=n>nodes</th><th>modules (first \u2026 last)</th>"
        "<th class=n>params</th><th class=n>fwd ms</th><th class=n>bwd ms</th><th class=n>comm ms</th>"
        "<th>time</th><th>recompute</th><th class=n>memory</th></tr></thead>"
    )
    legend = (
        '<div class="legend"><span>time bar, in the stage\'s colour:</span>'
        f'<span><span class="sw" style="background:{palette.kind_fill(0, "F")}"></span>forward (solid)</span>'
        f'<span><span class="sw" style="background:{palette.kind_fill(0, "B")}"></span>backward (light)</span>'
        f'<span><span class="sw" style="background:{palette.COMM_COLOUR}"></span>communication (grey)</span></div>'
    )
    return f'<table class="sortable">{head}<tbody>{"".join(rows)}</tbody></table>{legend}'


def boundary_table(data: PlanData) -> str:
    if not data.boundaries:
        return '<p class="note">No tensor crosses a stage boundary.</p>'
    rows = []
    for b in data.boundaries:
        to = ", ".join(str(c) for c in b.consumer_stages)
        skip = any(c - b.producer_stage > 1 for c in b.consumer_stages)
        skip_tag = ' <span class="tag win">skip</span>'
        rows.append(
            f'<tr data-stage="{b.producer_stage}"><td class="mono">{esc(b.name)}</td>'
            f'<td data-v="{b.producer_stage}">{swatch(b.producer_stage)}{b.producer_stage} \u2192 {esc(to)}'
            f"{skip_tag if skip else ''}</td>"
            f'<td class="mono">{esc("x".join(map(str, b.shape)) or "scalar")}</td><td>{esc(b.dtype)}</td>'
            f'<td class="n" data-v="{b.num_bytes}" title="{b.num_bytes:,} bytes">{esc(fmt_bytes(b.num_bytes))}</td></tr>'
        )
    head = "<thead><tr><th>tensor</th><th>stage \u2192 stages</th><th>shape</th><th>dtype</th><th class=n>size</th></tr></thead>"
    table = f'<table class="sortable">{head}<tbody>{"".join(rows)}</tbody></table>'
    if len(rows) > 12:
        return f"<details><summary>{len(rows)} boundary tensors</summary>{table}</details>"
    return table


def tied_groups(data: PlanData) -> str:
    if not data.tied_groups:
        return ""
    items = "".join(
        f"<li><code>{esc(g.fqn)}</code> ({esc(fmt_bytes(g.num_bytes))}) on stages "
        f"{esc(', '.join(map(str, g.stages)))}"
        + (f", also named {esc(', '.join(g.aliases))}" if g.aliases else "")
        + ("; gradient all-reduce not priced (plan saved by an older pipec)" if g.allreduce_time is None
           else f"; gradient all-reduce {esc(fmt_time(g.allreduce_time))} per step, after the schedule")
        + "</li>"
        for g in data.tied_groups
    )
    return f'<p class="note">Tied parameters (gradients summed across their stages):</p><ul>{items}</ul>'


CHART_CANDIDATES = 40  # bars in the candidates chart (the table lists all)


def _fastest(cands: Sequence[Candidate], win: int | None) -> tuple[list[Candidate], int | None]:
    """The chart's candidates: the fastest :data:`CHART_CANDIDATES` and the chosen one."""
    keep = sorted(range(len(cands)), key=lambda k: cands[k].step_time)[:CHART_CANDIDATES]
    if win is not None and win not in keep:
        keep.append(win)
    keep.sort()
    return [cands[k] for k in keep], (keep.index(win) if win is not None else None)


def candidates_section(data: PlanData) -> str:
    cands: Sequence[Candidate] = data.candidates
    win = data.chosen if data.chosen_candidate is not None else None  # the one fact pipec show reads too
    hybrid = any(c.num_ranks for c in cands)
    rows = []
    for i in sorted(range(len(cands)), key=lambda k: cands[k].step_time):
        c = cands[i]
        status = '<span class="tag win">\u2605 chosen</span>' if i == win else ""
        if not c.fits:
            status += ' <span class="tag nofit">does not fit</span>'
        peak = max(c.peak_memory, default=0)
        mesh = (f'<td class="n">{c.data_parallel}</td><td class="n">{c.num_ranks}</td>'
                f'<td>{esc(" x ".join(c.mesh_order))}</td>'
                f'<td class="n" data-v="{c.dp_allreduce_time}">{esc(fmt_time(c.dp_allreduce_time))}</td>'
                if hybrid else "")
        rows.append(
            f'<tr>{mesh}<td>{esc(c.schedule)}</td><td class="n">{c.num_microbatches}</td>'
            f'<td class="n">{c.stages_per_rank}</td>'
            f'<td class="n" data-v="{c.step_time}">{esc(fmt_time(c.step_time))}</td>'
            f'<td class="n" data-v="{c.bubble_fraction}">{fmt_pct(c.bubble_fraction)}</td>'
            f'<td class="n" data-v="{peak}" title="{esc(", ".join(fmt_bytes(p) for p in c.peak_memory))}">'
            f"{esc(fmt_bytes(peak))}</td><td>{status}</td><td>{esc(c.note)}</td></tr>"
        )
    head = (
        "<thead><tr>"
        + ("<th class=n>D</th><th class=n>P</th><th>mesh</th><th class=n>all-reduce</th>" if hybrid else "")
        + "<th>schedule</th><th class=n>micro-batches</th><th class=n>stages/rank</th>"
        "<th class=n>step time</th><th class=n>bubble</th><th class=n>peak memory</th><th></th>"
        "<th>note</th></tr></thead>"
    )
    chosen = f"Chosen: <b>{esc(candidate_label(cands[win]))}</b>. " if win is not None else ""
    return (
        f'<p class="note">{chosen}Every configuration the auto-planner simulated, fastest first; '
        "hatched red bars do not fit in memory.</p>"
        f"<figure>{candidates_svg(*_fastest(cands, win))}</figure>"
        f'<table class="sortable" style="margin-top:12px">{head}<tbody>{"".join(rows)}</tbody></table>'
    )
