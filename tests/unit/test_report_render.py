"""report.html on a hand-made plan: content, escaping, sections, measured runs."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import pipec.viz.report
from pipec.facade import Plan
from pipec.plan import Boundary, Candidate, PlanData, StageInfo
from pipec.schedule.generators import make_schedule
from pipec.types import NodeCost
from pipec.units import format_bytes, format_seconds
from pipec.viz.report import render_report, write_report
from pipec.viz.report_measured import load_measured

SVG_RE = re.compile(r"<svg\b.*?</svg>", re.S)
EVIL = '<script>alert("pwned")</script>'


def handmade_plan(
    *,
    model_name: str = "TinyNet",
    candidates: tuple[Candidate, ...] = (),
    node_prefix: str = "layers_",
    num_stages: int = 3,
    stages_per_rank: int = 1,
) -> Plan:
    """Stages of four nodes each, with a skip from stage 0 to 2."""
    num_ranks = num_stages // stages_per_rank
    stages, costs = [], {}
    for s in range(num_stages):
        names = tuple(f"{node_prefix}{4 * s + k}" for k in range(4))
        for k, n in enumerate(names):
            costs[n] = NodeCost(forward_time=1e-3 * (1 + s + k), input_grad_time=1e-3, weight_grad_time=1e-3, saved_bytes=1000)
        stages.append(
            StageInfo(
                index=s,
                rank=s % num_ranks,
                nodes=names,
                num_params=1_000_000 * (s + 1),
                param_bytes=4_000_000 * (s + 1),
                forward_time=sum(costs[n].forward_time for n in names),
                backward_time=sum(costs[n].backward_time for n in names),
                comm_time=1e-4,
                memory_bytes=16_000_000 * (s + 1),
                first_module=f"layers.{4 * s}",
                last_module=f"layers.{4 * s + 3}",
            )
        )
    boundaries = (
        Boundary(name=f"{node_prefix}3", producer_stage=0, consumer_stages=(1,), shape=(8, 512), dtype="float32", num_bytes=16384),
        Boundary(name=f"{node_prefix}1", producer_stage=0, consumer_stages=(2,), shape=(8, 64), dtype="float32", num_bytes=2048),
        Boundary(name=f"{node_prefix}7", producer_stage=1, consumer_stages=(2,), shape=(8, 256), dtype="bfloat16", num_bytes=4096),
    )
    times = [st.time for st in stages]
    data = PlanData(
        model_name=model_name,
        trace_method="fx",
        num_stages=num_stages,
        num_ranks=num_ranks,
        stages_per_rank=stages_per_rank,
        num_microbatches=4,
        batch_size=32,
        strategy="optimal",
        cost_model="h100-sxm",
        schedule=make_schedule("1f1b" if stages_per_rank == 1 else "interleaved-1f1b", num_stages, 4, stages_per_rank),
        stages=tuple(stages),
        boundaries=boundaries,
        node_costs=costs,
        memory_limit=(40_000_000,) * num_ranks,
        device_speeds=(1.0,) * num_ranks,
        bottleneck=max(times),
        lower_bound=sum(times) / num_stages,
        candidates=candidates,
    )
    return Plan(data)


CANDIDATES = (
    Candidate(schedule="1f1b", num_microbatches=4, stages_per_rank=1, step_time=0.05, bubble_fraction=0.3,
              peak_memory=(1, 2, 3), fits=True, note="balanced"),
    Candidate(schedule="gpipe", num_microbatches=16, stages_per_rank=1, step_time=0.04, bubble_fraction=0.1,
              peak_memory=(9 * 10**9, 2, 3), fits=False, note="needs <more> memory"),
    Candidate(schedule="zb-h1", num_microbatches=4, stages_per_rank=1, step_time=0.06, bubble_fraction=0.2,
              peak_memory=(1, 2, 3), fits=True),
)


def write_timelines(plan: Plan, directory: Path, *, scale: float = 1.25, steps: int = 3) -> None:
    """What the runtime would record if every action took ``scale`` times its prediction."""
    sim = plan.simulate()
    per_rank: dict[int, list[dict[str, object]]] = {}
    for step in range(steps):
        origin = 1e6 + step * sim.step_time * scale * 1e6 * 1.1
        for e in sim.timeline:
            per_rank.setdefault(e.rank, []).append(
                {"name": str(e.action), "ph": "X", "ts": origin + e.start * scale * 1e6,
                 "dur": (e.end - e.start) * scale * 1e6, "pid": 0, "tid": e.rank, "args": {"step": step}}
            )
    for rank, events in per_rank.items():
        events.append({"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "rank"}})
        (directory / f"timeline_rank{rank}.json").write_text(json.dumps({"traceEvents": events}))


def svgs_parse(html: str) -> int:
    svgs = SVG_RE.findall(html)
    for svg in svgs:
        ET.fromstring(svg)
    return len(svgs)


def test_report_shows_the_key_figures() -> None:
    plan = handmade_plan()
    html = render_report(plan.data, traced=plan.traced)
    sim = plan.simulate()
    assert svgs_parse(html) >= 3
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for needle in ("TinyNet", "1f1b", "h100-sxm", "optimal", format_seconds(sim.step_time),
                   f"{sim.bubble_fraction * 100:.1f}%", format_seconds(plan.data.bottleneck),
                   format_seconds(plan.data.lower_bound), format_bytes(40_000_000), "layers.4 \u2026 layers.7",
                   "8\u00d7512", format_bytes(16384), "bfloat16", "skip"):
        assert needle in html, needle
    for st in plan.stages:
        assert f'<tr data-stage="{st.index}">' in html
    assert 'id="measured"' not in html and 'id="candidates"' not in html


def test_interleaved_plan_shows_every_stage_and_rank() -> None:
    plan = handmade_plan(num_stages=4, stages_per_rank=2)
    html = render_report(plan.data, traced=plan.traced)
    svgs_parse(html)
    assert "interleaved-1f1b" in html and "4 on 2 ranks" in html
    glance = html[: html.index('id="stages"')]
    assert "rank 1 (stage 1, 3)" in glance  # memory bar tooltips name the rank's stages
    assert "rank 2" not in glance
    for stage in range(4):
        assert f"stage {stage} (rank {stage % 2})" in glance


def test_report_is_self_contained() -> None:
    html = render_report(handmade_plan(candidates=CANDIDATES).data)
    assert html.count("<script") == 1 and "<script src" not in html and "<link" not in html
    assert "@import" not in html and "url(http" not in html
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_plan_text_is_escaped() -> None:
    html = render_report(handmade_plan(model_name=EVIL, node_prefix='n<i>&"', candidates=CANDIDATES).data)
    assert EVIL not in html and "<i>" not in html and "<more>" not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    assert html.count("<script") == 1
    svgs_parse(html)


def test_candidates_only_for_auto_plans() -> None:
    assert 'id="candidates"' not in render_report(handmade_plan().data)
    html = render_report(handmade_plan(candidates=CANDIDATES).data)
    section = html[html.index('id="candidates"'):]
    assert "\u2605 chosen" in section and "does not fit" in section and "balanced" in section
    assert section.index("gpipe") < section.index("zb-h1")  # fastest first
    svgs_parse(html)


def test_measured_section_after_a_run(tmp_path: Path) -> None:
    plan = handmade_plan()
    write_timelines(plan, tmp_path, scale=1.25)
    path = write_report(plan.data, tmp_path, traced=plan.traced)
    html = path.read_text(encoding="utf-8")
    assert 'id="measured"' in html
    section = html[html.index('id="measured"'):]
    assert "1.25\u00d7" in section  # every stage and the step ran 1.25 times slower
    measured = load_measured(tmp_path)
    assert measured is not None and measured.num_steps == 3
    assert format_seconds(measured.step_time) in section
    assert svgs_parse(section) >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report-")] == []


def test_malformed_timelines_do_not_break_the_report(tmp_path: Path) -> None:
    plan = handmade_plan()
    write_timelines(plan, tmp_path)
    (tmp_path / "timeline_rank2.json").write_text('{"traceEvents": [{"name": "2F0", "ph": "X"}]}')
    html = write_report(plan.data, tmp_path, traced=plan.traced).read_text(encoding="utf-8")
    assert 'id="measured"' in html and "timeline_rank2.json" in html and "No timeline for rank 2" in html
    for rank in range(3):
        (tmp_path / f"timeline_rank{rank}.json").write_text("{not json")
    html = write_report(plan.data, tmp_path, traced=plan.traced).read_text(encoding="utf-8")
    assert 'id="measured"' not in html and "TinyNet" in html


def test_a_plan_that_cannot_be_simulated_still_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = handmade_plan()

    def broken(data: PlanData) -> None:
        raise RuntimeError("simulator <exploded>")

    monkeypatch.setattr(pipec.viz.report, "simulate_plan", broken)
    html = render_report(plan.data, traced=plan.traced)
    assert "simulator &lt;exploded&gt;" in html and "TinyNet" in html
    svgs_parse(html)


def test_gantt_charts_colour_by_stage_with_ids_unique_on_the_page(tmp_path: Path) -> None:
    from pipec.viz.palette import stage_colour

    made = handmade_plan(num_stages=3)
    plan = Plan(made.data.model_copy(update={"schedule": make_schedule("zb-h1", 3, 4)}))
    write_timelines(plan, tmp_path)
    html = write_report(plan.data, tmp_path, traced=plan.traced).read_text(encoding="utf-8")
    gantts = [s for s in SVG_RE.findall(html) if 'data-kind="F"' in s]
    assert len(gantts) == 3  # the schedule, then predicted and measured
    for svg in gantts:
        root = ET.fromstring(svg)
        boxes = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("data-kind") == "F"]
        assert {g.get("data-stage") for g in boxes} == {"0", "1", "2"}
        for g in boxes:  # a forward box is its stage's colour, as in every other picture
            rect = g.find("{http://www.w3.org/2000/svg}rect")
            assert rect is not None and rect.get("fill") == stage_colour(int(g.get("data-stage", "-1")))
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert "<pattern" in html and len(ids) == len(set(ids)), "element ids repeat on the page"
