"""The report's "Devices" section: which global rank is which (replica, pipeline rank), on which node.

Phase: report. Input: a :class:`~pipec.plan.PlanData` with ``data_parallel``,
``mesh_order`` and ``devices_per_node``. Output: HTML -- a sentence on the mesh
order and why it was chosen, a grid with one row per replica and one column per
pipeline rank (each cell: the global rank, its node, its stages; cells of one
node share a tint), and the per-stage gradient all-reduce times. Rank numbers
come from :func:`pipec.schedule.mesh.global_rank`, the one rule the runtime uses too.
"""

from __future__ import annotations

from pipec.plan import PlanData
from pipec.schedule.mesh import DP_PP, global_rank, node_of
from pipec.viz.palette import rank_colour, tint
from pipec.viz.report_fmt import esc, fmt_time

MAX_REPLICAS_SHOWN = 32  # rows of the grid; the rest follow the same rule


def mesh_section(data: PlanData) -> str:
    """The section's HTML (see the module docstring)."""
    d, p = data.data_parallel, data.num_ranks
    order = (data.mesh_order[0], data.mesh_order[1])
    per_node = data.devices_per_node or d * p
    together = order == DP_PP
    rule = "dp &times; P + pp" if together else "pp &times; D + dp"
    why = ("a pipeline's neighbouring ranks share a node, so boundary transfers use the fast link and each "
           "stage's gradient all-reduce crosses nodes" if together else
           "a stage's replicas share a node, so its gradient all-reduce uses the fast link and pipeline "
           "transfers cross nodes")
    stages_of: dict[int, list[int]] = {}
    for st in data.stages:
        stages_of.setdefault(st.rank, []).append(st.index)
    head = "".join(f"<th class=n>pp {r}</th>" for r in range(p))
    rows = []
    for dp in range(min(d, MAX_REPLICAS_SHOWN)):
        cells = []
        for pp in range(p):
            g = global_rank(dp, pp, data_parallel=d, num_ranks=p, mesh_order=order)
            node = node_of(g, per_node)
            cells.append(
                f'<td class="n" style="background:{tint(rank_colour(node), 0.75)}" '
                f'title="global rank {g}: replica {dp}, pipeline rank {pp}, node {node}, '
                f'stages {", ".join(map(str, stages_of.get(pp, [])))}">'
                f"<b>{g}</b> <small>node {node}</small></td>")
        rows.append(f"<tr><th>dp {dp}</th>{''.join(cells)}</tr>")
    more = (f'<p class="note">&hellip; and {d - MAX_REPLICAS_SHOWN} more replicas, by the same rule.</p>'
            if d > MAX_REPLICAS_SHOWN else "")
    reduce_rows = "".join(
        f'<tr><td class="n">{st.index}</td><td class="n">{st.rank}</td>'
        f'<td class="n" data-v="{st.dp_allreduce_time}">{esc(fmt_time(st.dp_allreduce_time))}</td></tr>'
        for st in data.stages)
    nodes = -(-(d * p) // per_node)
    return (
        f'<p class="note">{d} replicas &times; {p} pipeline ranks = {d * p} devices on {nodes} node(s) of '
        f"{per_node}. Mesh ({esc(', '.join(order))}): global rank = {rule}; {esc(why)}. The planner "
        "simulated both orders and kept the faster.</p>"
        f'<table><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'
        '<h3>Gradient all-reduce per stage</h3><p class="note">A ring over the stage\'s replicas, once per '
        "step, from the stage's last backward on (overlapping the drain; drawn under each rank's row in the "
        "schedule chart).</p>"
        f'<table class="sortable"><thead><tr><th class=n>stage</th><th class=n>rank</th><th class=n>all-reduce</th>'
        f"</tr></thead><tbody>{reduce_rows}</tbody></table>"
    )


__all__ = ["MAX_REPLICAS_SHOWN", "mesh_section"]
