"""Phase report: a plan as a plain-text table (``plan.summary()``, ``pipec show``).

Input: :class:`pipec.plan.PlanData`. Output: a string -- one row per stage
(rank, node count, first ... last module, parameters, forward / backward /
communication time per micro-batch -- boundary transfers and the share of a
tied-gradient all-reduce -- memory) rendered by ``rich`` without
colour codes, then the bottleneck (compute + communication of the slowest
stage) against the lower bound ``max(total / num_stages, largest node)``, which
counts compute only and says so: the boundary transfers and tied-gradient
all-reduces of the "comm" column are left out of it. A plan the auto-planner chose also
lists every candidate configuration it simulated, and says why the winner won.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.table import Table

from pipec.mode_ops import describe_nodes
from pipec.plan import Candidate, PlanData, StageInfo
from pipec.types import compute_dtype_name
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


def _allreduce(seconds: float | None) -> str:
    if seconds is None:
        return "gradient all-reduce not priced: plan saved by an older pipec"
    return f"gradient all-reduce {format_seconds(seconds)} per step, after the schedule"


def _bottleneck_parts(slowest: StageInfo | None) -> str:
    if slowest is None:
        return "no stages"
    compute = slowest.forward_time + slowest.backward_time
    return (f"stage {slowest.index}, marked *: compute {format_seconds(compute)} + communication "
            f"{format_seconds(slowest.comm_time + slowest.tied_time)}")


def _precision_line(precision: str) -> str:
    if precision == "fp32":
        return "precision fp32"
    dtype = compute_dtype_name(precision)
    return (f"precision {precision}: stage forwards under autocast in {dtype}, float32 master weights and "
            f"gradients, float boundaries cross in {dtype}"
            + ("; dynamic loss scaling at run time" if precision == "fp16" else ""))


def plan_summary(d: PlanData, measured: Mapping[int, int] | None = None) -> str:
    """The plan's stages as a text table, with its bottleneck and lower bound, and each
    stage's activation-recompute policy. ``measured``: peak bytes per rank from a run
    (``pipe.memory_stats().peak_bytes`` of each rank), shown beside the prediction."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header, justify in (("stage", "right"), ("rank", "right"), ("nodes", "right"),
                            ("modules", "left"), ("params", "right"), ("fwd ms", "right"),
                            ("bwd ms", "right"), ("comm ms", "right"), ("recompute", "left"),
                            ("memory", "right")):
        table.add_column(header, justify=justify, no_wrap=header != "modules",  # type: ignore[arg-type]
                         overflow="fold" if header == "modules" else "ellipsis")
    slowest = max(d.stages, key=lambda s: s.time) if d.stages else None
    for st in d.stages:
        mark = " *" if st is slowest else ""
        table.add_row(f"{st.index}{mark}", str(st.rank), str(len(st.nodes)),
                      _modules(st.first_module, st.last_module), _count(st.num_params),
                      _ms(st.forward_time), _ms(st.backward_time), _ms(st.comm_time + st.tied_time),
                      st.recompute, format_bytes(st.memory_bytes))
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
    if d.data_parallel > 1:
        console.print(data_parallel_line(d), soft_wrap=True)
    ratio = d.bottleneck / d.lower_bound if d.lower_bound > 0 else float("nan")
    lines = [
        f"bottleneck {format_seconds(d.bottleneck)} per micro-batch ({_bottleneck_parts(slowest)}); "
        f"lower bound {format_seconds(d.lower_bound)} = max(total compute / num_stages, largest node), "
        "compute only: communication (boundary transfers, tied all-reduces) is left out, so the gap "
        f"to it includes the communication; ratio {ratio:.3f}",
        f"{len(d.boundaries)} boundary tensors ({format_bytes(sum(b.num_bytes for b in d.boundaries))} "
        f"per micro-batch), {len(d.tied_groups)} tied parameter groups"
        + (": " + ", ".join(f"{g.fqn} on stages {list(g.stages)} ({_allreduce(g.allreduce_time)})"
                            for g in d.tied_groups) if d.tied_groups else ""),
    ]
    lines.append(_precision_line(d.precision))
    if d.batch_norm_layers and d.num_microbatches > 1:
        lines.append(f"batch norm per micro-batch ({', '.join(d.batch_norm_layers)}): statistics and gradients "
                     f"are those of {d.num_microbatches} accumulated micro-batches, not of the full batch")
    if d.mode_blind_random:
        lines.append(f"random in eval() too ({describe_nodes(d.mode_blind_random)}): traced in train() with no "
                     "train/eval argument; for inference partition the model in eval mode")
    lines.append(_memory_line(d, measured))
    limits = {m for m in d.memory_limit if m is not None}
    if limits:
        lines.append("memory limit per rank: " + ", ".join(format_bytes(m) for m in sorted(limits)))
    for line in lines:
        console.print(line, soft_wrap=True)
    if d.candidates:
        console.print()
        console.print(candidates_table(d.candidates))
        console.print(winner_line(d), soft_wrap=True)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def _memory_line(d: PlanData, measured: Mapping[int, int] | None) -> str:
    """Predicted memory per rank (its stages' sum) on NCCL, and on Gloo where it differs
    (:meth:`pipec.plan.StageInfo.memory_on`), beside the measured peak when given."""
    predicted = [0] * d.num_ranks
    gloo = [0] * d.num_ranks
    for st in d.stages:
        rank = d.schedule.rank_of(st.index)  # placement: the schedule's
        predicted[rank] += st.memory_on("nccl")
        gloo[rank] += st.memory_on("gloo")
    differs = gloo != predicted
    parts = []
    for rank, bytes_ in enumerate(predicted):
        part = f"rank {rank} {format_bytes(bytes_)}"
        if differs:
            part += f" (Gloo {format_bytes(gloo[rank])})"
        if measured is not None and rank in measured:
            got = measured[rank]
            part += f" / measured {format_bytes(got)}"
            if bytes_:
                part += f" ({got / bytes_:.2f}x" + (f", Gloo {got / gloo[rank]:.2f}x)" if differs else ")")
        parts.append(part)
    head = "memory per rank, predicted" + (" (NCCL; Gloo holds its sends to the step's end)" if differs else "")
    head += " / measured" if measured else ""
    return f"{head} (recompute {d.recompute}): " + ", ".join(parts)


def data_parallel_line(d: PlanData) -> str:
    """D, P, the mesh order and the all-reduces of a hybrid plan, e.g. "data parallel: D=4 replicas x
    P=2 ranks = 8 devices, mesh (dp, pp): a pipeline's ranks adjacent; ..."."""
    where = ("a pipeline's ranks adjacent (global rank = dp x P + pp)" if tuple(d.mesh_order) == ("dp", "pp")
             else "a stage's replicas adjacent (global rank = pp x D + dp)")
    nodes = ""
    if d.devices_per_node:
        world = d.data_parallel * d.num_ranks
        nodes = f", {-(-world // d.devices_per_node)} node(s) of {d.devices_per_node}"
    times = [st.dp_allreduce_time for st in d.stages]
    slowest = max(range(len(times)), key=times.__getitem__) if times else 0
    return (f"data parallel: D={d.data_parallel} replicas x P={d.num_ranks} ranks = "
            f"{d.data_parallel * d.num_ranks} devices{nodes}; mesh ({', '.join(d.mesh_order)}): {where}; "
            f"gradient all-reduce per stage across the replicas, from its last backward (overlapping the "
            f"drain): up to {format_seconds(max(times, default=0.0))} (stage {slowest})")


def _label(c: Candidate) -> str:
    v = f" v={c.stages_per_rank}" if c.stages_per_rank != 1 else ""
    shape = f"D={c.data_parallel} P={c.num_ranks} " if c.num_ranks else ""
    order = f" {'x'.join(c.mesh_order)}" if c.data_parallel > 1 and c.num_ranks > 1 else ""
    return f"{shape}{c.schedule} m={c.num_microbatches}{v}{order}"


SHOWN_CANDIDATES = 20  # rows of a hybrid search's table in the text summary (the report shows all)


def candidates_table(candidates: tuple[Candidate, ...]) -> Table:
    """The auto-planner's candidates in the order it ranked them (the chosen one first);
    a data-parallel search's with D, P and the mesh order, its first :data:`SHOWN_CANDIDATES`."""
    hybrid = any(c.num_ranks for c in candidates)
    shown = candidates[:SHOWN_CANDIDATES] if hybrid else candidates
    title = "auto-plan candidates" + (f" (first {len(shown)} of {len(candidates)})" if len(shown) < len(candidates)
                                      else "")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title=title, title_justify="left")
    columns = [("schedule", "left"), ("micro-batches", "right"), ("stages/rank", "right"),
               ("step ms", "right"), ("bubble", "right"), ("peak memory", "right"), ("fits", "left"), ("note", "left")]
    if hybrid:
        columns = [("D", "right"), ("P", "right"), ("mesh", "left"), ("schedule", "left"), ("v", "right"),
                   ("m", "right"), ("step ms", "right"), ("bubble", "right"), ("dp a-r ms", "right"),
                   ("peak mem", "right"), ("fits", "left"), ("note", "left")]
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=header != "note",  # type: ignore[arg-type]
                         overflow="fold" if header == "note" else "ellipsis")
    for c in shown:
        row = [c.schedule, str(c.num_microbatches), str(c.stages_per_rank), _ms(c.step_time),
               f"{c.bubble_fraction:.1%}", format_bytes(max(c.peak_memory, default=0)), "yes" if c.fits else "no",
               c.note]
        if hybrid:
            row = [str(c.data_parallel), str(c.num_ranks), "x".join(c.mesh_order), c.schedule,
                   str(c.stages_per_rank), str(c.num_microbatches), _ms(c.step_time), f"{c.bubble_fraction:.1%}",
                   _ms(c.dp_allreduce_time), format_bytes(max(c.peak_memory, default=0)),
                   "yes" if c.fits else "no", c.note]
        table.add_row(*row)
    return table


def winner_line(d: PlanData) -> str:
    """Why the plan's configuration (``d.chosen``, as the report reads it) won, e.g.
    "1f1b m=8: fastest of 9 candidates that fit (1.34 ms; zb-h1 m=8 is 1.39 ms)"."""
    chosen = d.chosen_candidate
    if chosen is None:
        return f"chosen: {d.schedule.name} m={d.num_microbatches} (not among the {len(d.candidates)} candidates)"
    fitting = [c for c in d.candidates if c.fits and not c.note.startswith("not simulated")]
    runner = min((c for c in fitting if c is not chosen), key=lambda c: c.step_time, default=None)
    head = f"chosen: {_label(chosen)}: "
    if runner is None:
        return head + (f"the only one of {len(d.candidates)} candidates that fits memory "
                       f"({format_seconds(chosen.step_time)} per step)")
    return head + (f"fastest of {len(fitting)} candidates that fit ({format_seconds(chosen.step_time)} per "
                   f"step; next {_label(runner)} is {format_seconds(runner.step_time)})"
                   + (f"; {len(d.candidates) - len(fitting)} more do not fit" if len(fitting) < len(d.candidates)
                      else ""))


__all__ = ["SHOWN_CANDIDATES", "candidates_table", "data_parallel_line", "plan_summary", "winner_line"]
