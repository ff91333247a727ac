"""Phase report: a plan as a plain-text table (``plan.summary()``, ``pipec show``).

Input: a :class:`pipec.plan.Plan`. Output: a string -- one row per stage
(rank, node count, first ... last module, parameters, forward / backward /
communication time per micro-batch, memory) rendered by ``rich`` without
colour codes, then the bottleneck against the lower bound
``max(total / num_stages, largest node)``.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table

from pipec.plan import Plan
from pipec.units import format_bytes, format_seconds

_WIDTH = 120


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _modules(first: str, last: str) -> str:
    first, last = first or "(root)", last or "(root)"
    return first if first == last else f"{first} … {last}"


def plan_summary(plan: Plan) -> str:
    """The plan's stages as a text table, with its bottleneck and lower bound."""
    d = plan.data
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header, justify in (("stage", "right"), ("rank", "right"), ("nodes", "right"),
                            ("modules", "left"), ("params", "right"), ("fwd ms", "right"),
                            ("bwd ms", "right"), ("comm ms", "right"), ("memory", "right")):
        table.add_column(header, justify=justify, no_wrap=header != "modules",  # type: ignore[arg-type]
                         overflow="fold" if header == "modules" else "ellipsis")
    slowest = max(d.stages, key=lambda s: s.time) if d.stages else None
    for st in d.stages:
        mark = " *" if st is slowest else ""
        table.add_row(f"{st.index}{mark}", str(st.rank), str(len(st.nodes)),
                      _modules(st.first_module, st.last_module), _count(st.num_params),
                      _ms(st.forward_time), _ms(st.backward_time), _ms(st.comm_time),
                      format_bytes(st.memory_bytes))
    out = io.StringIO()
    console = Console(file=out, width=_WIDTH, color_system=None, force_terminal=False,
                      no_color=True, highlight=False, emoji=False)
    batch = f", batch {d.batch_size}" if d.batch_size is not None else ""
    console.print(
        f"{d.model_name}: {d.num_stages} stages on {d.num_ranks} ranks, schedule {d.schedule.name}, "
        f"{d.num_microbatches} micro-batches{batch}; strategy {d.strategy}, cost model {d.cost_model}",
        soft_wrap=True,
    )
    console.print(table)
    ratio = d.bottleneck / d.lower_bound if d.lower_bound > 0 else float("nan")
    lines = [
        f"bottleneck {format_seconds(d.bottleneck)} per micro-batch (stage "
        f"{slowest.index if slowest else '-'}, marked *); lower bound {format_seconds(d.lower_bound)} "
        f"= max(total / num_stages, largest node); ratio {ratio:.3f}",
        f"{len(d.boundaries)} boundary tensors ({format_bytes(sum(b.num_bytes for b in d.boundaries))} "
        f"per micro-batch), {len(d.tied_groups)} tied parameter groups"
        + (": " + ", ".join(f"{g.fqn} on stages {list(g.stages)}" for g in d.tied_groups) if d.tied_groups else ""),
    ]
    limits = {m for m in d.memory_limit if m is not None}
    if limits:
        lines.append("memory limit per rank: " + ", ".join(format_bytes(m) for m in sorted(limits)))
    for line in lines:
        console.print(line, soft_wrap=True)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


__all__ = ["plan_summary"]
