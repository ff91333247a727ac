"""``synth``: a schedule built from the split's own F, I, W and communication times.

Phase: schedule (generator from costs; run at partition time, once the split is
known). Input: sizes, per-stage ``forward`` / ``input_grad`` / ``weight_grad``
seconds, communication (``comm`` per stage or ``transfers`` per stage edge, as
:func:`pipec.schedule.simulator.simulate` takes them), the plan's boundaries,
and ``max_in_flight[s]``: the most micro-batches stage ``s`` may hold (its
activation memory, the count :mod:`pipec.schedule.in_flight` gives each
schedule). Output: :class:`Synthesis` -- the schedule (named ``"synth"``), its
simulation, and where it came from.

How (the zero-bubble paper's approach, Qi et al. 2023, "Zero Bubble Pipeline
Parallelism", sections 3-4, extended):

1. greedy list scheduling (:mod:`pipec.schedule.synth_greedy`) under several
   policies -- ``I`` first or ``F`` first, which of a rank's stages first, how
   eagerly ``W`` fills a wait -- and several caps (the given ones and tighter);
2. every fixed schedule (:data:`pipec.schedule.generators.GENERATORS`) with the
   same placement whose micro-batches in flight fit ``max_in_flight``;
3. each candidate simulated exactly with the same costs; the fastest (ties: fewer
   activations held, then the greedy one) is the start of
4. a local search (:mod:`pipec.schedule.synth_search`): neighbouring actions swap
   places while the simulated step gets shorter and the caps hold.

So ``synth`` is never slower in simulation than the best fixed schedule that
fits the same memory, by construction. When a fixed schedule wins and
the search cannot shorten it, :attr:`Synthesis.source` names it,
:attr:`Synthesis.heuristic_won` is False and a log line says so: the heuristic lost.

Placement: one stage per rank; two per rank in a V
(:func:`~pipec.schedule.ir.v_placement`, as ``zb-v``); more per rank round-robin.

In a plan (``pipec.partition(schedule="synth")``,
:func:`pipec.partitioner.single.synthesized`): the split is made for ``zb-h1``,
``zb-v`` or ``interleaved-zb`` (one, two, more stages per rank), then synth is
built under the in-flight counts of every fixed schedule of that placement whose
memory fits each rank's limit on that split, and the fastest kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipec.errors import ConfigError, ScheduleError
from pipec.schedule.gen_common import SYNTH, check_sizes
from pipec.schedule.generators import GENERATORS
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.schedule.ir import Action, Schedule, round_robin_placement, v_placement
from pipec.schedule.simulator import Simulation, per_stage, simulate
from pipec.schedule.stage_graph import BoundarySpec, stage_graph
from pipec.schedule.synth_greedy import Policy, StageCosts, greedy_order
from pipec.schedule.synth_search import improve

log = logging.getLogger(__name__)

#: caps tried, as fractions of ``max_in_flight`` (rounded up, at least 1)
CAP_SCALES = (1.0, 0.75, 0.5)
#: the local search's default budget: this many actions simulated in all (20 to 1000 runs)
SEARCH_WORK = 200_000
#: how eagerly a W fills a wait, in units of its own time
W_FILLS = (0.0, 0.5, 1.0, math.inf)  # inf: a W only when nothing else can run


@dataclass(frozen=True)
class Synthesis:
    """The chosen schedule and how it was found.

    ``source`` is ``"greedy"`` when the heuristic won, else the name of the fixed
    schedule that did (its actions, renamed ``synth``); ``tried`` maps each
    candidate's label to its simulated step time (seconds)."""

    schedule: Schedule
    simulation: Simulation
    source: str
    tried: Mapping[str, float]
    improved: bool = False  # the local search shortened the step

    @property
    def heuristic_won(self) -> bool:
        """Whether synth found an order no fixed schedule gives: a greedy one, or a
        fixed one the local search improved. False: synth runs a fixed schedule's order."""
        return self.source == "greedy" or self.improved


def synth_placement(num_stages: int, stages_per_rank: int) -> tuple[int, ...]:
    """One stage per rank in order; two in a V; more round-robin."""
    ranks = num_stages // stages_per_rank
    return v_placement(num_stages, ranks) if stages_per_rank == 2 else round_robin_placement(num_stages, ranks)


def synthesize(
    num_stages: int,
    num_microbatches: int,
    stages_per_rank: int = 1,
    *,
    forward: float | Sequence[float],
    input_grad: float | Sequence[float],
    weight_grad: float | Sequence[float],
    comm: float | Sequence[float] = 0.0,
    transfers: Mapping[tuple[int, int], tuple[float, float]] | None = None,
    boundaries: Sequence[BoundarySpec] | None = None,
    max_in_flight: Sequence[int] | None = None,
    max_rank_in_flight: Sequence[int] | None = None,
    activation_bytes: float | Sequence[float] | None = None,
    search_budget: int | None = None,
) -> Synthesis:
    """The fastest schedule found for these costs within ``max_in_flight`` (default: no
    cap but the number of micro-batches) and, when given, ``max_rank_in_flight``: the
    most stage micro-batches each rank may hold at once (a fixed schedule's simulated
    ``peak_inflight``, for "the same memory" counted per rank). ``search_budget``: the
    simulations the local search may run (default: about :data:`SEARCH_WORK` actions'
    worth, 20 to 1000). See the module docstring.

    Raises :class:`~pipec.errors.ScheduleError` for sizes the schedule cannot take,
    :class:`~pipec.errors.ConfigError` for bad costs or caps."""
    check_sizes(SYNTH, num_stages, num_microbatches, stages_per_rank)
    n, m = num_stages, num_microbatches
    caps = _check_caps(max_in_flight, n, m)
    placement = synth_placement(n, stages_per_rank)
    ranks = n // stages_per_rank
    graph = stage_graph(n, ranks, boundaries, placement=placement)
    costs = StageCosts(
        per_stage("forward", forward, n), per_stage("input_grad", input_grad, n),
        per_stage("weight_grad", weight_grad, n), _latency(comm, transfers, n, graph.producers),
    )

    candidates: dict[str, Schedule] = {}
    for scale in CAP_SCALES:
        tight = tuple(max(1, math.ceil(c * scale)) for c in caps)
        for first in (True, False):
            for late in (True, False):
                for fill in W_FILLS:
                    policy = Policy(input_grad_first=first, late_stage_first=late, w_fill=fill)
                    label = f"greedy cap={scale:g} {'I' if first else 'F'}-first " \
                            f"{'late' if late else 'early'}-stage w_fill={fill:g}"
                    try:
                        rows = greedy_order(graph, m, costs, tight, policy, max_rank_in_flight)
                    except ScheduleError:
                        continue  # these caps starve this order (a rank full of one stage's forwards)
                    candidates[label] = Schedule.model_construct(
                        name=SYNTH, num_stages=n, num_microbatches=m, stages_per_rank=stages_per_rank,
                        actions=tuple(tuple(r) for r in rows), placement=placement)
    for name, generator in GENERATORS.items():
        try:
            fixed = generator(n, m, stages_per_rank)
        except ScheduleError:
            continue  # sizes this schedule does not take
        if fixed.placement != placement or any(a > c for a, c in zip(in_flight_from_schedule(fixed), caps)):
            continue  # another placement (another split), or more memory than allowed
        candidates[name] = fixed

    def run(cand: Schedule) -> Simulation:
        return simulate(cand, forward=costs.forward, input_grad=costs.input_grad, weight_grad=costs.weight_grad,
                        comm=comm, transfers=transfers, boundaries=boundaries, activation_bytes=activation_bytes)

    best: tuple[tuple[float, int, int], str, Simulation] | None = None
    tried: dict[str, float] = {}
    seen: set[tuple[tuple[Action, ...], ...]] = set()
    for label, cand in candidates.items():
        if cand.actions in seen:
            continue
        seen.add(cand.actions)
        sim = run(cand)
        if max_rank_in_flight is not None and any(a > c for a, c in zip(sim.peak_inflight, max_rank_in_flight)):
            continue  # a fixed schedule holding more at once on some rank
        tried[label] = sim.step_time
        # fastest; then fewer micro-batches held; then the greedy order over a fixed one
        key = (sim.step_time, max(sim.peak_inflight), 0 if label.startswith("greedy") else 1)
        if best is None or key < best[0]:
            best = (key, label, sim)
    if best is None:
        raise ScheduleError(
            f"synth: no schedule fits max_in_flight={list(caps)} and max_rank_in_flight="
            f"{None if max_rank_in_flight is None else list(max_rank_in_flight)}; raise the caps"
        )
    _, label, sim = best
    source = "greedy" if label.startswith("greedy") else label

    def evaluate(cand: Schedule) -> float | None:
        if any(a > c for a, c in zip(in_flight_from_schedule(cand), caps)):
            return None
        try:
            found = run(cand)
        except ScheduleError:
            return None  # the swap deadlocks
        if max_rank_in_flight is not None and any(a > c for a, c in zip(found.peak_inflight, max_rank_in_flight)):
            return None
        return found.step_time

    actions = 3 * n * m
    budget = search_budget if search_budget is not None else max(20, min(1000, SEARCH_WORK // actions))
    start = candidates[label].model_copy(update={"name": SYNTH})
    chosen, step = improve(start, sim.step_time, evaluate, budget)
    improved = step < sim.step_time
    tried[f"{label} + local search"] = step
    sim = run(chosen)
    if source != "greedy" and not improved:
        log.info("synth: the fixed schedule %s (%.4g s) beat every greedy order and the local search; "
                 "using its actions", source, sim.step_time)
    else:
        log.info("synth: %s%s, %.4g s simulated", label, " + local search" if improved else "", sim.step_time)
    return Synthesis(chosen, sim, source, tried, improved)


def _check_caps(max_in_flight: Sequence[int] | None, num_stages: int, num_microbatches: int) -> tuple[int, ...]:
    if max_in_flight is None:
        return (num_microbatches,) * num_stages
    caps = tuple(max_in_flight)
    if len(caps) != num_stages or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in caps):
        raise ConfigError(
            f"synth: max_in_flight must be {num_stages} integers >= 1 (micro-batches each stage may hold), "
            f"found {list(caps)}; pass e.g. in_flight_from_schedule(make_schedule('zb-h1', ...))"
        )
    return tuple(min(c, num_microbatches) for c in caps)


def _latency(
    comm: float | Sequence[float],
    transfers: Mapping[tuple[int, int], tuple[float, float]] | None,
    num_stages: int,
    producers: Sequence[Sequence[int]],
) -> dict[tuple[int, int, bool], float]:
    """``latency[(p, c, forward)]`` as the simulator charges it: the edge's transfer
    time, or ``comm[p]`` (the producer's) both ways."""
    if transfers is not None:
        out = {}
        for (p, c), (fwd, bwd) in transfers.items():
            out[(p, c, True)] = float(fwd)
            out[(p, c, False)] = float(bwd)
        return out
    per = per_stage("comm", comm, num_stages)
    return {(p, c, fwd): per[p] for c in range(num_stages) for p in producers[c] for fwd in (True, False)}


__all__ = ["CAP_SCALES", "SEARCH_WORK", "W_FILLS", "Synthesis", "synth_placement", "synthesize"]
