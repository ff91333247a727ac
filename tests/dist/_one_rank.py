"""Any plan run in this process: every stage on one rank, the real executor, the real actions.

:func:`one_rank` keeps the plan's stages, boundaries and schedule but puts every
stage on rank 0: the schedule's actions become one row, in the order a dry run
of the multi-rank schedule starts them (:func:`pipec.schedule.dry_run.execute`
with unit costs), so each rank's own order -- which ``I`` precedes which ``W``,
how many micro-batches a stage holds -- is exactly the multi-rank schedule's.
The executor then hands boundary tensors and gradients over locally instead of
through P2P, and no process group is needed: a cheap way to check what a
schedule computes, not how it communicates.
"""

from __future__ import annotations

from pipec.facade import Plan
from pipec.schedule.backends import lower_per_backend
from pipec.schedule.dry_run import execute, unit_costs
from pipec.schedule.ir import Schedule
from pipec.schedule.stage_graph import graph_of


def one_rank_schedule(schedule: Schedule, boundaries: object) -> Schedule:
    """``schedule``'s compute actions on one rank, in dry-run start order."""
    compute = schedule.compute_only()
    graph = graph_of(compute, boundaries)  # type: ignore[arg-type]
    run = execute(compute, graph, unit_costs(compute.num_stages))
    if not run.finished:
        raise AssertionError(f"schedule {schedule.name!r} deadlocks: {run.blocked}")
    # a dependency ends (start + 1) no later than its dependent starts: start order is topological
    started = sorted(
        (times[1], rank, i, a)
        for rank, row in enumerate(compute.actions)
        for i, (a, times) in enumerate(zip(row, run.times[rank]))
    )
    return Schedule(
        name=f"{schedule.name}-one-rank",
        num_stages=compute.num_stages,
        num_microbatches=compute.num_microbatches,
        stages_per_rank=compute.num_stages,
        actions=(tuple(a for *_, a in started),),
    )


def one_rank(plan: Plan) -> Plan:
    """``plan`` with every stage on rank 0 (see the module docstring); a loaded plan keeps
    its directory, so its stages come from the saved stage files."""
    schedule = one_rank_schedule(plan.data.schedule, plan.data.boundaries)
    data = plan.data.model_copy(update={"schedule": schedule, "num_ranks": 1, "stages_per_rank": plan.num_stages,
                                        "lowered": lower_per_backend(schedule, plan.data.boundaries)})
    return Plan(data, traced=plan.traced, loss_fn=plan.loss_fn, directory=plan.directory)
