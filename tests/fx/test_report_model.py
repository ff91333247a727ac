"""report.html on plans of traced models: the module picture and the whole page.

``traced_plan`` builds a plan by hand from a real trace (contiguous stages
balanced on made-up node costs), so these tests do not depend on the
partitioner; ``test_report_on_partitioned_plan`` uses ``pipec.partition``
once it exists.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch
from models import MLP, UNet

import pipec
from pipec.facade import Plan
from pipec.plan import Boundary, Candidate, PlanData, StageInfo
from pipec.schedule.generators import make_schedule
from pipec.types import NodeCost
from pipec.viz.modules_svg import MAX_BLOCKS, modules_svg
from pipec.viz.report import render_report, write_report

SVG_RE = re.compile(r"<svg\b.*?</svg>", re.S)


def traced_plan(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    num_stages: int,
    *,
    schedule: str = "1f1b",
    num_microbatches: int = 4,
    candidates: Sequence[Candidate] = (),
    model_name: str | None = None,
) -> Plan:
    traced = pipec.trace(model, inputs)
    nodes = [n for n in traced.nodes if n.op not in ("placeholder", "output", "get_attr")]
    costs = {}
    for n in nodes:
        f = 1e-5 * (1 + n.output_bytes / 4096 + n.param_bytes / 4096)
        costs[n.name] = NodeCost(
            forward_time=f,
            input_grad_time=f,
            weight_grad_time=f if n.param_bytes else 0.0,
            saved_bytes=n.output_bytes,
            output_bytes=n.output_bytes,
            param_bytes=n.param_bytes,
        )
    total = sum(c.total_time for c in costs.values())
    stage_of: dict[str, int] = {}
    acc = 0.0
    for n in nodes:
        stage_of[n.name] = min(num_stages - 1, int(acc / total * num_stages))
        acc += costs[n.name].total_time
    boundaries = []
    for n in nodes:
        consumers = sorted({stage_of[u] for u in n.users if u in stage_of and stage_of[u] != stage_of[n.name]})
        if consumers and n.outputs:
            o = n.outputs[0]
            boundaries.append(
                Boundary(
                    name=n.name,
                    producer_stage=stage_of[n.name],
                    consumer_stages=tuple(consumers),
                    shape=o.shape,
                    dtype=o.dtype,
                    num_bytes=o.num_bytes,
                )
            )
    stages = []
    for s in range(num_stages):
        ns = [n for n in nodes if stage_of[n.name] == s]
        pb = sum(n.param_bytes for n in ns)
        paths = [n.module_path for n in ns if n.module_path]
        stages.append(
            StageInfo(
                index=s,
                rank=s,
                nodes=tuple(n.name for n in ns),
                num_params=pb // 4,
                param_bytes=pb,
                forward_time=sum(costs[n.name].forward_time for n in ns),
                backward_time=sum(costs[n.name].backward_time for n in ns),
                comm_time=2e-5,
                memory_bytes=4 * pb + 2 * sum(n.output_bytes for n in ns),
                first_module=paths[0] if paths else "",
                last_module=paths[-1] if paths else "",
            )
        )
    times = [st.time for st in stages]
    data = PlanData(
        model_name=model_name or traced.model_name,
        trace_method=traced.method,
        num_stages=num_stages,
        num_ranks=num_stages,
        stages_per_rank=1,
        num_microbatches=num_microbatches,
        strategy="optimal",
        cost_model="test",
        schedule=make_schedule(schedule, num_stages, num_microbatches),
        stages=tuple(stages),
        boundaries=tuple(boundaries),
        node_costs=costs,
        memory_limit=(10**9,) * num_stages,
        device_speeds=(1.0,) * num_stages,
        bottleneck=max(times),
        lower_bound=sum(times) / num_stages,
        candidates=tuple(candidates),
    )
    return Plan(data, traced=traced)


def unet_plan(**kwargs: object) -> Plan:
    torch.manual_seed(0)
    return traced_plan(UNet(), (torch.randn(2, 1, 16, 16),), 4, **kwargs)  # type: ignore[arg-type]


def test_module_picture_groups_modules_and_draws_skip_arcs() -> None:
    plan = unet_plan()
    svg = modules_svg(plan.data, plan.traced)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    blocks = [g for g in root.iter(f"{ns}g") if g.find(f"{ns}rect") is not None and g.find(f"{ns}path") is None]
    assert 4 <= len(blocks) <= MAX_BLOCKS
    # every stage has blocks, and a block's stage is a stage of the plan
    assert {g.get("data-stage") for g in blocks} == {"0", "1", "2", "3"}
    # one arc per (boundary, consumer); the U-Net skips are dashed long arcs
    arcs = [p for p in root.iter(f"{ns}path") if p.get("marker-end")]
    assert len(arcs) == sum(len(b.consumer_stages) for b in plan.boundaries)
    skips = [b for b in plan.boundaries if max(b.consumer_stages) - b.producer_stage > 1]
    assert skips, "the U-Net split should send encoder outputs past the next stage"
    assert sum(1 for p in arcs if p.get("stroke-dasharray")) == sum(
        sum(1 for c in b.consumer_stages if c - b.producer_stage > 1) for b in plan.boundaries
    )
    text = "".join(root.itertext())
    for b in plan.boundaries:
        assert "\u00d7".join(map(str, b.shape)) in text
    assert "up.2.0" in text or "up.2" in text  # module names from the trace label the blocks


def test_module_picture_without_trace_falls_back_to_one_block_per_stage() -> None:
    plan = unet_plan()
    loaded = Plan(plan.data)  # as after pipec.load: no traced graph
    root = ET.fromstring(modules_svg(loaded.data, loaded.traced))
    ns = "{http://www.w3.org/2000/svg}"
    blocks = [g for g in root.iter(f"{ns}g") if g.find(f"{ns}rect") is not None and g.find(f"{ns}path") is None]
    assert len(blocks) == plan.num_stages
    assert plan.stages[0].first_module in "".join(root.itertext())


def test_full_report_of_traced_plan(tmp_path: Path) -> None:
    plan = traced_plan(MLP(), (torch.randn(8, 16),), 3, schedule="gpipe", num_microbatches=2)
    path = write_report(plan.data, tmp_path, traced=plan.traced)
    html = path.read_text(encoding="utf-8")
    for svg in SVG_RE.findall(html):
        ET.fromstring(svg)
    assert "gpipe" in html and "MLP" in html
    assert 'id="measured"' not in html and 'id="candidates"' not in html


def test_report_on_partitioned_plan() -> None:
    plan = pipec.partition(
        UNet(), (torch.randn(8, 1, 16, 16),), num_stages=3, num_microbatches=4, cost_model="h100-sxm"
    )
    html = render_report(plan.data, traced=plan.traced)
    svgs = SVG_RE.findall(html)
    assert len(svgs) >= 4
    for svg in svgs:
        ET.fromstring(svg)
    for st in plan.stages:
        assert f'data-stage="{st.index}"' in html
