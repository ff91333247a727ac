"""The report's "measured vs predicted" section, shown after a run.

Phase: report. Inputs: the plan, its :class:`~pipec.schedule.simulator.Simulation`
(the prediction; None when it could not be simulated) and a
:class:`~pipec.viz.report_measured.Measured`. The measured step is turned
into a ``Simulation``-shaped value (:func:`measured_simulation`) so the same
Gantt chart draws both; the tables compare per stage the forward and backward
time (medians over micro-batches and steps) and per action kind the durations.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pipec.plan import PlanData
from pipec.schedule.ir import Action, ActionKind, Schedule
from pipec.viz.report_fmt import esc, fmt_bytes, fmt_ms, fmt_time, ratio_class
from pipec.viz.report_measured import Measured
from pipec.viz.report_parts import card, swatch
from pipec.viz.svg import GANTT_MARGINS

if TYPE_CHECKING:
    from pipec.schedule.simulator import Simulation

_COMPUTE = ("F", "B", "I", "W")


def measured_simulation(measured: Measured, step: int, data: PlanData) -> Simulation:
    """One measured step as a :class:`Simulation` (no memory figures), for drawing."""
    from pipec.schedule.simulator import CollectiveSpan, Simulation, TimelineEvent

    events = sorted((TimelineEvent(s, e, r, a) for s, e, r, a in measured.timeline(step)), key=lambda e: (e.start, e.rank))
    num_ranks = max([data.num_ranks, *(e.rank + 1 for e in events)])
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    busy = [0.0] * num_ranks
    for e in events:
        rows[e.rank].append(e.action)
        if e.action.kind.is_compute:
            busy[e.rank] += e.end - e.start
    step_time = measured.step_times[step]
    num_stages = max([data.num_stages, *(e.action.stage + 1 for e in events)])
    same_shape = num_ranks == data.num_ranks and num_stages == data.num_stages
    schedule = Schedule(
        name=f"measured ({data.schedule.name})",
        num_stages=num_stages,
        num_microbatches=max([data.num_microbatches, *(e.action.microbatch + 1 for e in events)]),
        stages_per_rank=data.stages_per_rank,
        actions=tuple(tuple(r) for r in rows),
        placement=data.schedule.placement if same_shape else (),
    )
    return Simulation(
        schedule=schedule,
        step_time=step_time,
        bubble_fraction=1.0 - sum(busy) / (num_ranks * step_time) if step_time > 0 else 0.0,
        busy_time=tuple(busy),
        peak_inflight=(0,) * num_ranks,
        memory=tuple(((0.0, 0),) for _ in range(num_ranks)),
        peak_memory=(0,) * num_ranks,
        timeline=tuple(events),
        collectives=tuple(CollectiveSpan(c.start, c.end, (c.rank,), "all-reduce (tied gradients)")
                          for c in measured.spans(step) if c.rank < num_ranks),
    )


def timelines_prediction(data: PlanData, predicted: Simulation) -> float:
    """The predicted time the measured timelines cover: the simulated step less the
    runtime's per-step overhead (splitting the batch, the step's end), which falls
    outside the first action's start and the last action's end."""
    step = data.runtime_overhead.step if data.runtime_overhead is not None else 0.0
    return max(0.0, predicted.step_time - step)


def error_line(measured_step: float, predicted_step: float) -> str:
    """One line: ``measured step X ms vs predicted Y ms (+Z%)``, Z = measured / predicted - 1
    (positive: the run was slower than predicted)."""
    if predicted_step <= 0:
        return f"measured step {fmt_ms(measured_step)} ms vs predicted {fmt_ms(predicted_step)} ms"
    return (f"measured step {fmt_ms(measured_step)} ms vs predicted {fmt_ms(predicted_step)} ms "
            f"({measured_step / predicted_step - 1:+.1%})")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_backward(measured: Measured, stage: int) -> list[float]:
    """Backward durations of ``stage``: ``B`` actions, or ``I`` + ``W`` of each micro-batch."""
    full = measured.durations(stage, "B")
    if full:
        return full
    split: dict[tuple[int, int], float] = {}
    for m in measured.actions:
        if m.action.stage == stage and m.action.kind in (ActionKind.I, ActionKind.W):
            key = (m.step, m.action.microbatch)
            split[key] = split.get(key, 0.0) + m.duration
    return list(split.values())


def _ratio_cells(predicted: float | None, measured: float | None) -> str:
    pred = f'<td class="n">{fmt_ms(predicted)}</td>' if predicted is not None else '<td class="n">\u2013</td>'
    meas = f'<td class="n">{fmt_ms(measured)}</td>' if measured is not None else '<td class="n">\u2013</td>'
    if predicted and measured is not None:
        ratio = measured / predicted
        title = f"measured / predicted = {ratio:.4g}"
        return f'{pred}{meas}<td class="n {ratio_class(ratio)}" data-v="{ratio}" title="{title}">{ratio:.2f}\u00d7</td>'
    return f'{pred}{meas}<td class="n">\u2013</td>'


def stage_comparison(data: PlanData, measured: Measured) -> str:
    rows = []
    for st in data.stages:
        fwd = _median(measured.durations(st.index, "F"))
        bwd = _median(measured_backward(measured, st.index))
        rows.append(
            f'<tr data-stage="{st.index}"><td data-v="{st.index}">{swatch(st.index)}{st.index}</td>'
            f'<td class="n">{st.rank}</td>{_ratio_cells(st.forward_time, fwd)}{_ratio_cells(st.backward_time, bwd)}</tr>'
        )
    head = (
        "<thead><tr><th>stage</th><th class=n>rank</th><th class=n>fwd predicted ms</th>"
        "<th class=n>fwd measured ms</th><th class=n>ratio</th><th class=n>bwd predicted ms</th>"
        "<th class=n>bwd measured ms</th><th class=n>ratio</th></tr></thead>"
    )
    return f'<table class="sortable">{head}<tbody>{"".join(rows)}</tbody></table>'


def action_comparison(measured: Measured, predicted: Simulation | None) -> str:
    pred: dict[tuple[int, str], list[float]] = {}
    if predicted is not None:
        for e in predicted.timeline:
            pred.setdefault((e.action.stage, e.action.kind.value), []).append(e.end - e.start)
    meas: dict[tuple[int, str], list[float]] = {}
    for m in measured.actions:
        meas.setdefault((m.action.stage, m.action.kind.value), []).append(m.duration)
    rows: dict[bool, list[str]] = {True: [], False: []}
    for stage, kind in sorted(meas, key=lambda k: (k[0], _COMPUTE.index(k[1]) if k[1] in _COMPUTE else 9, k[1])):
        durations = meas[(stage, kind)]
        tip = f"min {fmt_time(min(durations))}, max {fmt_time(max(durations))}"
        rows[kind in _COMPUTE].append(
            f'<tr data-stage="{stage}"><td data-v="{stage}">{swatch(stage)}{stage}</td><td class="mono">{esc(kind)}</td>'
            f'<td class="n">{len(durations)}</td>{_ratio_cells(_median(pred.get((stage, kind), [])), _median(durations))}'
            f'<td class="n">{esc(tip)}</td></tr>'
        )
    allreduce = allreduce_row(measured, predicted)
    if allreduce:
        rows[False].append(allreduce)
    head = (
        "<thead><tr><th>stage</th><th>action</th><th class=n>count</th><th class=n>predicted ms</th>"
        "<th class=n>measured ms</th><th class=n>ratio</th><th class=n>measured range</th></tr></thead>"
    )
    out = f'<table class="sortable">{head}<tbody>{"".join(rows[True])}</tbody></table>'
    if rows[False]:
        out += (
            f"<details><summary>communication actions ({len(rows[False])} kinds): a RECV lasts as long "
            "as the rank waited; ALLREDUCE is the time the step runs past its last action: the "
            f'tied-gradient all-reduce</summary><table class="sortable">{head}<tbody>{"".join(rows[False])}'
            "</tbody></table></details>"
        )
    return out


def measured_allreduce(measured: Measured) -> list[float]:
    """Per step with an all-reduce, the time the step ran past its last action: the
    tied-gradient all-reduces once the last rank joined them (a rank's own
    ``ALLREDUCE`` span also holds its wait for the others)."""
    out = []
    for step in sorted({c.step for c in measured.collectives}):
        actions = [end for _, end, _, _ in measured.timeline(step)]
        spans = [c.end for c in measured.spans(step)]
        if actions:
            out.append(max(0.0, max(spans) - max(actions)))
    return out


def predicted_allreduce(predicted: Simulation) -> float | None:
    """The simulated step's time past its last action (the collectives), or None without any."""
    if not predicted.collectives:
        return None
    return max(0.0, predicted.step_time - max((e.end for e in predicted.timeline), default=0.0))


def allreduce_row(measured: Measured, predicted: Simulation | None) -> str:
    """The all-reduce's row of the communication table ('' when no step had one)."""
    durations = measured_allreduce(measured)
    if not durations:
        return ""
    pred = predicted_allreduce(predicted) if predicted is not None else None
    tip = f"min {fmt_time(min(durations))}, max {fmt_time(max(durations))}"
    return (
        '<tr><td data-v="-1">\u2013</td><td class="mono">ALLREDUCE</td>'
        f'<td class="n">{len(durations)}</td>{_ratio_cells(pred or None, _median(durations))}'
        f'<td class="n">{esc(tip)}</td></tr>'
    )


def _width(sim: Simulation, longest: float, width: int) -> int:
    """Chart width that puts ``sim`` on the scale of the longest step (the
    chart's margins stay fixed)."""
    if longest <= 0 or sim.step_time <= 0:
        return width
    return max(240, round(GANTT_MARGINS + (width - GANTT_MARGINS) * sim.step_time / longest))


def measured_section(
    data: PlanData,
    predicted: Simulation | None,
    measured: Measured,
    gantt: Callable[[Simulation, int, str], str],
    width: int = 1200,
) -> str:
    """Cards (step time measured vs predicted), both Gantt charts, the tables.

    ``gantt(sim, width, id_prefix)`` draws one chart; the prefix keeps the
    ids of the two charts apart from each other and from the page's others.
    """
    step = measured.typical_step
    out = []
    for w in measured.warnings:
        out.append(f'<div class="warnbox">{esc(w)}</div>')
    missing = sorted(set(range(data.num_ranks)) - set(measured.ranks))
    if missing:
        out.append(
            f'<div class="warnbox">No timeline for rank {esc(", ".join(map(str, missing)))}; '
            "the measured step time covers the other ranks only.</div>"
        )
    if predicted is not None:
        line = error_line(measured.step_time, timelines_prediction(data, predicted))
        out.append(f'<p class="error-line"><b>{esc(line)}</b> (median of {measured.num_steps} step(s), '
                   f"first action to last, all ranks; predicted by {esc(data.cost_model)})</p>")
    cards = [card("measured step", fmt_time(measured.step_time), f"median of {measured.num_steps} step(s)", "hi")]
    if predicted is not None and predicted.step_time > 0:
        ratio = measured.step_time / predicted.step_time
        cards.append(card("predicted step", fmt_time(predicted.step_time), f"simulated, {data.cost_model}"))
        cards.append(card("measured / predicted", f"{ratio:.2f}\u00d7", "1.00\u00d7 is a perfect prediction"))
    measured_sim = measured_simulation(measured, step, data)
    cards.append(card("measured bubble", f"{measured_sim.bubble_fraction * 100:.1f}%", f"step {step}"))
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    longest = max(measured_sim.step_time, predicted.step_time if predicted is not None else 0.0)
    if predicted is not None:
        out.append(f"<h3>Predicted</h3><figure>{gantt(predicted, _width(predicted, longest, width), 'gantt-predicted')}</figure>")
    out.append(
        f"<h3>Measured (step {step} of {measured.num_steps}, "
        f"{esc(fmt_time(measured.step_times[step]))})</h3>"
        f"<figure>{gantt(measured_sim, _width(measured_sim, longest, width), 'gantt-measured')}</figure>"
        "<figcaption>Both charts share one time scale: the shorter step is the narrower chart.</figcaption>"
    )
    out.append("<h3>Per stage</h3>" + stage_comparison(data, measured))
    if measured.memory:
        out.append("<h3>Memory per rank</h3>" + memory_comparison(data, measured.memory))
    out.append(
        '<p class="note">Medians over micro-batches and steps; ratio = measured / predicted '
        "(green within 15%, amber within 50%).</p>"
    )
    out.append("<h3>Per action</h3>" + action_comparison(measured, predicted))
    out.append(f'<p class="note">From {esc(", ".join(measured.files))}.</p>')
    return "".join(out)


def memory_comparison(data: PlanData, memory: Mapping[int, int]) -> str:
    """Predicted memory per rank (its stages' sum; each stage's recompute policy) beside the
    peak the runtime measured over its last training step (``pipe.memory_stats()``): on
    NCCL, and on Gloo where it differs (:meth:`pipec.plan.StageInfo.memory_on`)."""
    ranks = [[st for st in data.stages if data.schedule.rank_of(st.index) == rank] for rank in range(data.num_ranks)]
    differs = any(st.memory_on("gloo") != st.memory_on("nccl") for st in data.stages)
    rows = []
    for rank, stages in enumerate(ranks):
        got = memory.get(rank)
        policies = ", ".join(f"{st.index}: {st.recompute}" for st in stages)
        cells = f'<td class="n">{rank}</td><td>{esc(policies)}</td>'
        for backend in ("nccl", "gloo") if differs else ("nccl",):
            predicted = sum(st.memory_on(backend) for st in stages)
            ratio = f"{got / predicted:.2f}\u00d7" if got is not None and predicted else "n/a"
            cells += (f'<td class="n" data-v="{predicted}">{esc(fmt_bytes(predicted))}</td>'
                      f'<td class="n">{ratio}</td>')
        cells += (f'<td class="n" data-v="{got if got is not None else -1}">'
                  f'{esc(fmt_bytes(got) if got is not None else "n/a")}</td>')
        rows.append(f"<tr>{cells}</tr>")
    heads = "".join(f"<th class=n>predicted{on}</th><th class=n>measured / predicted{on}</th>"
                    for on in ((" (NCCL)", " (Gloo)") if differs else ("",)))
    head = (f"<thead><tr><th class=n>rank</th><th>stage: recompute</th>{heads}"
            "<th class=n>measured peak</th></tr></thead>")
    return f'<table class="sortable">{head}<tbody>{"".join(rows)}</tbody></table>'
