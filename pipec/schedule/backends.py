"""Lowering per backend: the one policy, applied once when a plan is made.

Phase: schedule (lowering, for a plan). Input: a compute-only
:class:`~pipec.schedule.ir.Schedule` and the plan's boundaries. Output: one
lowered, validated schedule per communication backend (:data:`BACKENDS`),
stored on the plan (:attr:`pipec.plan.PlanData.lowered`, ``plan.json``): the
schedule that runs is the one validated, simulated, saved and drawn.

The policy (:func:`lower_for`): the RECVs are ordered so every pair of ranks
receives whole actions in send order (:func:`~pipec.schedule.lowering.lower`)
when that is possible -- NCCL matches a pair's point-to-point messages in issue
order, and this order makes each receive take the next messages. With several
stages per rank and tensors that skip stages it may be impossible (one RECV per
stage and micro-batch would have to take messages the sender interleaves with
others'); then each RECV stays right before its compute
(``match_pair_order=False``), validated deadlock-free, and the runtime keeps
each pair's order itself: Gloo matches messages by tag, and on NCCL receives
are posted at message granularity in each peer's send order
(:mod:`pipec.runtime.pair_order`). A backend whose schedule fails validation has
no lowering. Any other backend, and a single process, follow Gloo's policy;
:func:`backend_kind` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pipec.errors import PlanError, ScheduleError
from pipec.schedule.ir import Schedule
from pipec.schedule.lowering import lower
from pipec.schedule.stage_graph import BoundarySpec
from pipec.schedule.validator import validate

if TYPE_CHECKING:
    from pipec.plan import PlanData

log = logging.getLogger(__name__)

#: the backends a plan is lowered for, each with its own message-order policy
BACKENDS: tuple[str, ...] = ("gloo", "nccl")


def backend_kind(backend: str | None) -> str:
    """The lowering a ``torch.distributed`` backend needs: ``"nccl"`` for NCCL (any
    backend string naming it, such as ``"cpu:gloo,cuda:nccl"``), else ``"gloo"``
    (Gloo, MPI, one process without a process group)."""
    return "nccl" if backend is not None and "nccl" in backend.lower() else "gloo"


def lower_for(
    schedule: Schedule, boundaries: Sequence[BoundarySpec] | None, backend: str | None, *, check: bool = True
) -> Schedule:
    """``schedule`` lowered under ``backend``'s policy (module docstring), and
    validated unless ``check=False``.

    Raises :class:`~pipec.errors.ScheduleError` when the schedule is invalid
    (a dependency, or a deadlock found by the dry run)."""
    kind = backend_kind(backend)
    compute = schedule.compute_only()
    try:
        lowered = lower(compute, boundaries)
        pair_order = True
    except ScheduleError:
        # Interleaved placement with skip tensors can need a per-pair message order that
        # one RECV per (stage, micro-batch) cannot give; the runtime keeps it per message
        # (Gloo by tag, NCCL by receiving in each peer's send order), so the plain order is safe.
        log.info("lowering %s for %s without per-pair ordering of whole actions", schedule.name, kind)
        lowered = lower(compute, boundaries, match_pair_order=False)
        pair_order = False
    if check:
        validate(lowered, boundaries, check_pair_order=pair_order)
    return lowered


def lower_per_backend(schedule: Schedule, boundaries: Sequence[BoundarySpec] | None) -> dict[str, Schedule]:
    """``{backend: lowered schedule}`` for each of :data:`BACKENDS` that can run it
    (one that fails validation has no entry). What a plan stores."""
    out: dict[str, Schedule] = {}
    for backend in BACKENDS:
        try:
            out[backend] = lower_for(schedule, boundaries, backend)
        except ScheduleError as exc:
            log.info("schedule %s has no %s lowering: %s", schedule.name, backend, str(exc).split("\n", 1)[0])
    return out


def default_backend(lowered: Mapping[str, Schedule]) -> str:
    """The backend whose lowering a plan simulates, saves as ``schedule.txt`` and
    draws when none is named: NCCL's when there is one (the strictest order), else Gloo's."""
    return "nccl" if "nccl" in lowered else "gloo"


def plan_lowered(data: PlanData, backend: str | None = None) -> Schedule:
    """The plan's lowered schedule for ``backend`` (default: :func:`default_backend`).

    The one the plan stored when it was made (:attr:`pipec.plan.PlanData.lowered`);
    a plan without them (saved before pipec stored them, or data built by hand)
    is lowered now under the same policy -- not validated, as before: a plan read
    from disk was validated when loaded, and the executor names the action where
    a broken schedule fails.
    Raises :class:`~pipec.errors.PlanError` when the stored schedule does not
    lower the plan's schedule (the data was edited) or the backend cannot run it."""
    stored = data.lowered
    kind = backend_kind(backend) if backend is not None else default_backend(stored)
    if not stored:
        return lower_for(data.schedule, data.boundaries, kind, check=False)
    found = stored.get(kind)
    if found is None:
        raise PlanError(
            f"the plan's schedule {data.schedule.name!r} has no {kind} lowering (the plan holds lowerings "
            f"for {sorted(stored)}; a plan made before pipec could order skip tensors' messages for NCCL has "
            f"only Gloo's); re-create the plan with pipec.partition, or run with --backend "
            f"{' / '.join(sorted(stored))}"
        )
    if found.compute_only().actions != data.schedule.compute_only().actions or found.placement != data.schedule.placement:
        raise PlanError(
            f"the plan's lowered {kind} schedule does not lower its schedule {data.schedule.name!r} (the plan "
            "data was changed after it was made); re-create the plan, or rebuild its data with "
            "pipec.schedule.backends.lower_per_backend(schedule, boundaries)"
        )
    return found


__all__ = ["BACKENDS", "backend_kind", "default_backend", "lower_for", "lower_per_backend", "plan_lowered"]
