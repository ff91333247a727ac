"""``report.html``: one self-contained page that shows a plan, and after a run
how the run compared with the plan.

Phase: report (after partition; again after ``pipec run``). Input: a
:class:`~pipec.plan.PlanData` (with its traced graph, when in memory) and
optionally the measured timelines (:func:`~pipec.viz.report_measured.load_measured`). Output: HTML with inline
SVG, CSS and a little JS -- no network, no external fonts or scripts -- in
sections:

1. the plan at a glance (key figures, memory per rank against its limit);
   with data parallelism, the devices: which global rank is which (replica,
   pipeline rank) on which node, and each stage's gradient all-reduce (:mod:`.report_mesh`);
2. the stages and the tensors crossing them;
3. the model's modules coloured by stage, boundaries as arcs (:mod:`.modules_svg`);
4. the schedule's Gantt chart and 5. memory over the step (:mod:`pipec.viz.svg`);
6. measured against predicted, when timelines exist (:mod:`.report_compare`);
7. the auto-planner's candidates, for an auto plan.

A stage has one colour in every picture (:mod:`.palette`), the Gantt charts
included; hovering one highlights it everywhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipec._version import __version__
from pipec.plan import PlanData
from pipec.schedule.simulator import Simulation, simulate_plan
from pipec.types import TracedGraph
from pipec.viz.modules_svg import modules_svg
from pipec.viz.report_compare import measured_section
from pipec.viz.report_fmt import esc, fmt_bytes
from pipec.viz.report_measured import Measured, load_measured
from pipec.viz.report_mesh import mesh_section
from pipec.viz.report_parts import (
    boundary_table,
    candidates_section,
    glance,
    rank_memory,
    stage_table,
    tied_groups,
)
from pipec.viz.report_style import CSS, JS
from pipec.viz.svg import memory_svg, schedule_svg

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
GANTT_WIDTH = 1200  # the page's content width, so charts are drawn 1:1


def _strip_prolog(svg: str) -> str:
    """An SVG document as an inline element: no XML declaration or doctype."""
    start = svg.find("<svg")
    return svg[start:] if start > 0 else svg


def _gantt(sim: Simulation, width: int = GANTT_WIDTH, id_prefix: str = "gantt") -> str:
    return _strip_prolog(schedule_svg(sim, width=width, colour_by="stage", id_prefix=id_prefix))


def _memory(sim: Simulation) -> str:
    return _strip_prolog(memory_svg(sim, width=GANTT_WIDTH, height=260))


def _figure(draw: str, caption: str) -> str:
    return f"<figure>{draw}</figure><figcaption>{caption}</figcaption>"


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def _simulate(data: PlanData) -> tuple[Simulation | None, str]:
    try:
        return simulate_plan(data), ""
    except Exception as exc:  # the report still shows everything else
        logger.warning("report: could not simulate the plan: %s", exc)
        return None, f"{type(exc).__name__}: {exc}"


def _error_box(what: str, error: str) -> str:
    return f'<div class="errbox">No {esc(what)}: {esc(error)}</div>'


def _try(fn: Callable[[Simulation], str], sim: Simulation | None, what: str, error: str) -> str:
    if sim is None:
        return _error_box(what, error or "the plan could not be simulated")
    try:
        return fn(sim)
    except Exception as exc:  # a broken picture must not hide the rest of the report
        logger.warning("report: could not draw the %s: %s", what, exc)
        return _error_box(what, f"{type(exc).__name__}: {exc}")


def render_report(
    data: PlanData, *, traced: TracedGraph | None = None, measured: Measured | None = None
) -> str:
    """The report of a plan as one HTML string (see the module docstring); ``traced``
    (the plan's traced graph, when in memory) names the modules in the model picture."""
    sim, sim_error = _simulate(data)
    peak = rank_memory(data)
    if sim is not None and not any(peak):  # a plan without a memory estimate: activations only
        peak = list(sim.peak_memory)
    sections = [
        _section(
            "glance",
            "The plan at a glance",
            glance(
                data,
                step_time=sim.step_time if sim is not None else None,
                bubble=sim.bubble_fraction if sim is not None else None,
                peak=peak,
            ),
        ),
        _section(
            "stages",
            "Stages",
            stage_table(data) + "<h3>Boundary tensors</h3>" + boundary_table(data) + tied_groups(data),
            "Times per micro-batch on the stage's device; click a column to sort.",
        ),
        _section(
            "model",
            "The model by stage",
            _figure(
                _modules(data, traced),
                "Blocks: modules in execution order, width = share of compute time, colour = stage. "
                "Arcs: tensors crossing stages (per micro-batch), thicker = bigger; dashed = skip connection.",
            ),
        ),
        _section(
            "schedule",
            f"Schedule: {data.schedule.name}",
            _figure(
                _try(_gantt, sim, "schedule chart", sim_error),
                "One row per rank; colour = stage, shade = kind (forward solid, backward light, "
                "W hatched); hover an action for its times."
                + (" The band under a row: that rank's gradient all-reduce across the replicas."
                   if data.data_parallel > 1 else ""),
            )
            + f"<details><summary>schedule as text</summary><pre class=mono>{esc(data.schedule.to_text())}</pre></details>",
            f"{data.num_microbatches} micro-batches on {data.num_ranks} ranks, simulated with the plan's costs.",
        ),
        _section(
            "memory",
            "Memory over the step",
            _figure(_try(_memory, sim, "memory chart", sim_error), "Activation memory held per rank over one step."),
        ),
    ]
    if data.data_parallel > 1:
        sections.insert(1, _section("devices", f"Devices: {data.data_parallel} x {data.num_ranks}",
                                    mesh_section(data)))
    if measured is not None:
        sections.append(
            _section("measured", "Measured against predicted", measured_section(data, sim, measured, _safe_gantt))
        )
    if data.candidates:
        sections.append(_section("candidates", "Candidates the auto-planner compared", candidates_section(data)))
    return _page(data, sections)


def _safe_gantt(sim: Simulation, width: int, id_prefix: str) -> str:
    return _try(lambda s: _gantt(s, width, id_prefix), sim, "schedule chart", "")


def _modules(data: PlanData, traced: TracedGraph | None) -> str:
    try:
        return modules_svg(data, traced)
    except Exception as exc:  # a broken picture must not hide the rest of the report
        logger.warning("report: could not draw the modules: %s", exc)
        return _error_box("model picture", f"{type(exc).__name__}: {exc}")


def _page(data: PlanData, sections: list[str]) -> str:
    links = [("glance", "At a glance"), ("stages", "Stages"), ("model", "Model"), ("schedule", "Schedule"), ("memory", "Memory")]
    if data.data_parallel > 1:
        links.insert(1, ("devices", "Devices"))
    if any('id="measured"' in s for s in sections):
        links.append(("measured", "Measured"))
    if data.candidates:
        links.append(("candidates", "Candidates"))
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in links)
    title = f"{data.model_name}: {data.num_stages}-stage pipeline plan"
    subtitle = (
        f"{data.num_stages} stages on {data.num_ranks} ranks \u00b7 {data.schedule.name} \u00b7 "
        f"{data.num_microbatches} micro-batches \u00b7 cost model {data.cost_model} \u00b7 "
        f"precision {data.precision}"
    )
    limit = ", ".join(fmt_bytes(x) if x else "none" for x in data.memory_limit) or "none"
    footer = (
        f"pipec {esc(__version__)} \u00b7 plan format {data.format_version} \u00b7 "
        f"traced with {esc(data.trace_method)} \u00b7 memory limit per rank: {esc(limit)}"
        + (f" \u00b7 built from <code>{esc(data.factory)}</code>" if data.factory else "")
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="top"><div class="wrap"><h1>{esc(data.model_name)}</h1>'
        f'<span class="sub">{esc(subtitle)}</span></div></header>'
        f'<nav class="toc"><div class="wrap">{nav}</div></nav>'
        f'<main class="wrap">{"".join(sections)}</main>'
        f'<footer><div class="wrap">{footer}</div></footer>'
        f"<script>{JS}</script></body></html>\n"
    )


def write_report(
    data: PlanData,
    directory: str | Path,
    *,
    traced: TracedGraph | None = None,
    measured: Measured | None = None,
) -> Path:
    """Write ``directory/report.html`` atomically and return its path.

    Without ``measured``, the timelines a run left in ``directory``
    (``timeline_rank<r>.json``) are read, so rewriting the report after a run
    adds the measured section.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if measured is None:
        measured = load_measured(directory)
    text = render_report(data, traced=traced, measured=measured)
    target = directory / REPORT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
