"""Check a plan read from disk: its numbers agree with each other and its schedule is valid.

Phase: codegen (used by :func:`pipec.codegen.load_plan_data`, before any stage file is
imported). Input: :class:`~pipec.plan.PlanData` as ``plan.json`` held it (pydantic
has checked the types) and the file it came from, for messages. Output:
``None``, or :class:`~pipec.errors.PlanError` naming the file, what was
expected, what was found and what to do.

pydantic checks each field; this checks what ties them together, the
invariants every plan ``pipec.partition`` makes holds:

1. sizes: ``num_stages``, ``num_ranks``, ``stages_per_rank`` and
   ``num_microbatches`` equal the schedule's, and ``stages`` is stages
   ``0 .. num_stages - 1`` in order;
2. placement: each stage's ``rank`` is the rank the schedule runs it on;
3. nodes: no node in two stages; every boundary is produced by a node of its
   producer stage and read by later stages; tied groups and per-rank lists
   name stages and ranks that exist;
4. the schedule: :func:`pipec.schedule.validator.validate` with the plan's
   boundaries -- every stage x micro-batch has its ``F`` and its backward
   (``B``, or ``I`` and ``W``), in an order that cannot deadlock;
5. an auto plan's ``chosen`` candidate is the plan's own schedule, micro-batches
   and stages per rank (``pipec show`` and report.html both name it).

A plan that breaks one would run with the wrong gradients or hang, so it is
refused; the runtime trusts a loaded plan.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipec.errors import PlanError, ScheduleError
from pipec.plan import PlanData
from pipec.schedule.ir import Schedule

RERUN = "re-run `pipec partition` (or plan.save(DIR)) to write the plan again"


def _refuse(file: Path, problem: str) -> PlanError:
    return PlanError(f"{file} is not a consistent plan: {problem}; it was edited or damaged after pipec "
                     f"wrote it: {RERUN}")


def check_plan_data(data: PlanData, file: Path) -> None:
    """Raise :class:`PlanError` unless ``data`` (read from ``file``) holds the invariants above."""
    _check_sizes(data, file)
    _check_nodes(data, file)
    _check_chosen(data, file)
    check_schedule(data.schedule, data, file)
    for backend, lowered in data.lowered.items():
        _check_lowered(backend, lowered, data, file)


def _check_lowered(backend: str, lowered: Schedule, data: PlanData, file: Path) -> None:
    """A stored lowering: a known backend, the plan's compute actions and placement,
    valid (dependencies, and deadlock-free in a dry run). Not the per-pair order of
    whole RECV actions: every backend's runtime keeps a pair's message order per
    message (Gloo by tag, NCCL in each peer's send order: pipec.runtime.pair_order),
    and a lowering may leave whole actions out of that order where skip tensors
    cross interleaved stages (pipec.schedule.backends)."""
    from pipec.schedule.backends import BACKENDS

    if backend not in BACKENDS:
        raise _refuse(file, f"it holds a schedule lowered for {backend!r}; expected backends {list(BACKENDS)}")
    if (lowered.compute_only().actions != data.schedule.compute_only().actions
            or lowered.placement != data.schedule.placement):
        raise _refuse(file, f"its {backend} lowered schedule does not lower its schedule {data.schedule.name!r}")
    check_schedule(lowered, data, file, check_pair_order=False)


def _check_sizes(data: PlanData, file: Path) -> None:
    sched = data.schedule
    for field, value, found in (("num_stages", data.num_stages, sched.num_stages),
                                ("num_ranks", data.num_ranks, sched.num_ranks),
                                ("stages_per_rank", data.stages_per_rank, sched.stages_per_rank),
                                ("num_microbatches", data.num_microbatches, sched.num_microbatches)):
        if value != found:
            raise _refuse(file, f"{field} is {value} but its schedule {sched.name!r} has {field} {found}")
    if data.num_stages != data.num_ranks * data.stages_per_rank:
        raise _refuse(file, f"num_stages ({data.num_stages}) must be num_ranks ({data.num_ranks}) x "
                            f"stages_per_rank ({data.stages_per_rank})")
    indices = [st.index for st in data.stages]
    if indices != list(range(data.num_stages)):
        raise _refuse(file, f"expected stages 0..{data.num_stages - 1} in order (num_stages is "
                            f"{data.num_stages}), found stages {indices}")
    where = sched.placement
    if len(where) != data.num_stages or any(not 0 <= r < data.num_ranks for r in where):
        raise _refuse(file, f"its schedule places stages on ranks {list(where)}; expected one rank in "
                            f"0..{data.num_ranks - 1} for each of the {data.num_stages} stages")
    for st in data.stages:
        if st.rank != sched.rank_of(st.index):
            raise _refuse(file, f"stage {st.index} is on rank {st.rank}, but the schedule runs it on rank "
                                f"{sched.rank_of(st.index)} (ranks 0..{data.num_ranks - 1})")
    for field, values in (("memory_limit", data.memory_limit), ("device_speeds", data.device_speeds)):
        if values and len(values) != data.num_ranks:
            raise _refuse(file, f"{field} has {len(values)} entries, expected one per rank ({data.num_ranks})")


def _check_nodes(data: PlanData, file: Path) -> None:
    owner: dict[str, int] = {}
    for st in data.stages:
        for node in st.nodes:
            if node in owner:
                raise _refuse(file, f"node {node!r} is in stage {owner[node]} and in stage {st.index}")
            owner[node] = st.index
    last = data.num_stages - 1
    for b in data.boundaries:
        if not 0 <= b.producer_stage <= last:
            raise _refuse(file, f"boundary {b.name!r} comes from stage {b.producer_stage}, but the plan "
                                f"has stages 0..{last}")
        if owner.get(b.name) != b.producer_stage:
            where = f"stage {owner[b.name]}" if b.name in owner else "no stage"
            raise _refuse(file, f"boundary {b.name!r} is produced by stage {b.producer_stage}, but node "
                                f"{b.name!r} is in {where}")
        if not b.consumer_stages or any(not b.producer_stage < c <= last for c in b.consumer_stages):
            raise _refuse(file, f"boundary {b.name!r} from stage {b.producer_stage} is read by stages "
                                f"{list(b.consumer_stages)}; expected later stages, up to {last}")
        if b.transfer_times and (len(b.transfer_times) != len(b.consumer_stages)
                                 or not all(math.isfinite(t) and t >= 0 for t in b.transfer_times)):
            raise _refuse(file, f"boundary {b.name!r} has transfer times {list(b.transfer_times)}; expected "
                                f"one time >= 0 seconds per consumer stage {list(b.consumer_stages)}")
    for g in data.tied_groups:
        if any(not 0 <= s <= last for s in g.stages):
            raise _refuse(file, f"tied parameter {g.fqn!r} lives on stages {list(g.stages)}, but the "
                                f"plan has stages 0..{last}")


def _check_chosen(data: PlanData, file: Path) -> None:
    if not data.candidates and data.chosen is None:
        return
    chosen = data.chosen_candidate
    if chosen is None:
        want = (f"an index in 0..{len(data.candidates) - 1} of its {len(data.candidates)} candidates"
                if data.candidates else "none, since it lists no candidates")
        raise _refuse(file, f"its chosen candidate is {data.chosen}, expected {want}")
    found = (chosen.schedule, chosen.num_microbatches, chosen.stages_per_rank)
    expected = (data.schedule.name, data.num_microbatches, data.stages_per_rank)
    if found != expected:
        raise _refuse(file, f"its chosen candidate {data.chosen} is (schedule, num_microbatches, stages_per_rank) "
                            f"= {found}, but the plan is {expected}")


def check_schedule(schedule: Schedule, data: PlanData, file: Path, *, check_pair_order: bool = True) -> None:
    """:func:`~pipec.schedule.validator.validate` ``schedule`` (compute-only or
    lowered) with the plan's boundaries; a :class:`PlanError` naming ``file``."""
    from pipec.schedule.validator import validate

    try:
        validate(schedule, data.boundaries, check_pair_order=check_pair_order)
    except ScheduleError as exc:
        # the first paragraph names the action, stage and micro-batch; the grid stays
        # on the cause (shown with --debug), one line is what a terminal can take
        problem = str(exc).split("\n\n", 1)[0]
        raise _refuse(file, problem) from exc


__all__ = ["RERUN", "check_plan_data", "check_schedule"]
