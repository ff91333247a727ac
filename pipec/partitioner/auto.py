"""Phase partition, automatic: search the schedule, micro-batches and stages per rank.

Input: the arguments of :func:`pipec.partition` with any of ``schedule``,
``num_microbatches`` and ``stages_per_rank`` set to ``"auto"``. Output: the
:class:`~pipec.plan.PlanData` (and traced graph) of the configuration with the smallest simulated
step time that fits memory, its ``data.candidates`` listing every
configuration tried. The phases, in order::

    search_space        the configurations: (schedule, num_microbatches, stages_per_rank)
    trace + cost        once per distinct micro-batch size (shapes change with it)
    for each config     partition_traced -> simulate_plan -> Trial
    choose              fits first; then step time; ties -> less memory
    candidates          one Candidate per trial, sorted, with a note why it won or lost;
                        ``data.chosen`` is the winner's index (0), what summary and report read

**The hardware stays fixed.** The number of ranks is what the user has:
``num_stages / stages_per_rank`` for a fixed ``stages_per_rank``. With
``stages_per_rank="auto"``, ``num_stages`` is read as the number of ranks (as
with one stage per rank) and each rank may hold ``v`` stages: ``v = 1`` for
``gpipe``, ``1f1b``, ``zb-h1`` and ``zb-h2``; ``v`` in :data:`INTERLEAVED_DEPTHS` (so
``num_stages * v`` stages in all) for ``interleaved-1f1b`` and ``interleaved-zb``;
``v = 2`` (a V) for ``zb-v`` and ``dualpipe-v``; 1 and 2 for ``synth``, built from
each split's own costs (:mod:`pipec.schedule.synth`).

**Micro-batches**: ``"auto"`` tries every divisor of the batch up to
``MICROBATCHES_PER_RANK * num_ranks``; ``None`` is the same default as a plain
:func:`pipec.partition`.

**Memory**: a candidate fits when every rank's memory under the plan's model
(:mod:`pipec.partitioner.chain`: parameters, optimizer state, activations
times the schedule's micro-batches in flight; the sum of
``plan.stages[i].memory_bytes`` over the rank's stages) is within its limit.
That model includes the activations the simulator's ``peak_memory`` counts.
A configuration the optimal split cannot fit is re-split without a limit, so
its step time is still known; it is listed with ``fits=False`` and the
smallest per-rank limit any split of it needs. A configuration that cannot be
split at all (more stages than cut positions) is logged and left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from pipec.errors import ConfigError, PartitionError, ScheduleError
from pipec.partitioner import config
from pipec.partitioner.config import MemoryLimit
from pipec.partitioner.inputs import (
    AUTO,
    batch_size,
    default_microbatches,
    first_microbatch,
    first_target,
    split_inputs,
)
from pipec.partitioner.search import min_memory_limit
from pipec.partitioner.single import (
    Partitioned,
    chain_for,
    check_strategy,
    partition_traced,
    resolve_cost_model,
)
from pipec.plan import Candidate, PlanData
from pipec.schedule.simulator import simulate_plan
from pipec.types import CostModel, NodeCost, TracedGraph
from pipec.units import format_bytes, format_seconds

log = logging.getLogger(__name__)

INTERLEAVED_DEPTHS = (2, 4)  # stages per rank tried for interleaved-1f1b and interleaved-zb
MICROBATCHES_PER_RANK = 8  # "auto" micro-batches: divisors of the batch up to this times num_ranks


class Config(NamedTuple):
    """One configuration the search tries."""

    schedule: str
    num_microbatches: int
    stages_per_rank: int

    @property
    def label(self) -> str:
        v = f" v={self.stages_per_rank}" if self.stages_per_rank != 1 else ""
        return f"{self.schedule} m={self.num_microbatches}{v}"


class SearchSpace(NamedTuple):
    num_ranks: int
    configs: tuple[Config, ...]


def search_space(
    *, num_stages: int, schedule: str, num_microbatches: int | str | None,
    stages_per_rank: int | str, batch: int | None,
) -> SearchSpace:
    """The configurations to try (see the module docstring for the semantics)."""
    from pipec.schedule.gen_common import accepts_depth, stage_depths
    from pipec.schedule.generators import SCHEDULE_NAMES

    config.count("num_stages", num_stages)
    if stages_per_rank == AUTO:
        ranks = num_stages
    else:
        ranks = config.num_ranks(num_stages, config.count("stages_per_rank", stages_per_rank))
    schedules = SCHEDULE_NAMES if schedule == AUTO else (schedule,)
    if num_microbatches == AUTO:
        high = MICROBATCHES_PER_RANK * ranks
        counts = [d for d in range(1, min(batch, high) + 1) if batch % d == 0] if batch else [1]
    elif num_microbatches is None:
        counts = [default_microbatches(batch, ranks)]
    else:
        counts = [config.count("num_microbatches", num_microbatches, high=batch,
                               advice="" if batch is None else f" (the batch has {batch} samples along dim 0)")]
    configs = []
    for m in counts:
        for name in schedules:
            accepted = stage_depths(name, INTERLEAVED_DEPTHS)
            depths: Iterable[int] = accepted if stages_per_rank == AUTO else (int(stages_per_rank),)
            configs += [Config(name, m, v) for v in depths if accepts_depth(name, v)]
    if not configs:
        raise ConfigError(
            f"schedule={schedule!r} with stages_per_rank={stages_per_rank!r}: no configuration to try; "
            "interleaved-1f1b and interleaved-zb need stages_per_rank >= 2, zb-v and dualpipe-v 2, synth 1 or 2 "
            "and the other schedules 1; pass "
            "stages_per_rank='auto' or a value the schedule accepts"
        )
    return SearchSpace(ranks, tuple(configs))


@dataclass(frozen=True)
class Costed:
    """One micro-batch size, traced and costed."""

    traced: TracedGraph
    node_costs: Mapping[str, NodeCost]
    cost_model: CostModel


@dataclass(frozen=True)
class Trial:
    """One configuration, split and simulated. ``data`` was split under the memory
    limit when ``fits``; else without one, and ``need`` is the smallest per-rank
    memory some split of it needs (a lower bound with several stages per rank)."""

    config: Config
    data: PlanData
    step_time: float
    bubble_fraction: float
    rank_memory: tuple[int, ...]
    limits: tuple[int | None, ...]
    fits: bool
    need: int


def partition_auto(
    model: nn.Module, example_inputs: Any, *, num_stages: int, num_microbatches: int | str | None,
    schedule: str, stages_per_rank: int | str, loss_fn: Callable[..., Any] | None,
    cost_model: str | Path | CostModel, memory_limit: MemoryLimit, device_speeds: Sequence[float] | None,
    strategy: str, example_kwargs: Mapping[str, Any] | None, method: str,
    optimizer_state_bytes_per_param: int, leaf_modules: Iterable[type[nn.Module] | str], target: Any = None,
    precision: str = "fp32",
    recompute: str = "none",
) -> Partitioned:
    """:func:`pipec.partition` with some of its choices ``"auto"`` (see the module docstring)."""
    from pipec.costs.timer import progress_bar
    from pipec.tracing import trace

    args, kwargs = split_inputs(example_inputs, example_kwargs)
    batch = batch_size(args, kwargs)
    space = search_space(num_stages=num_stages, schedule=schedule, num_microbatches=num_microbatches,
                         stages_per_rank=stages_per_rank, batch=batch)
    check_strategy(strategy)
    config.device_speeds(device_speeds, space.num_ranks)
    if memory_limit is not None:
        config.memory_limits(memory_limit, space.num_ranks, None)
    config.count("optimizer_state_bytes_per_param", optimizer_state_bytes_per_param, low=0)
    leaf_modules = tuple(leaf_modules)
    costed: dict[int, Costed] = {}  # by micro-batch size: every shape, cost and boundary depends on it
    for m in sorted({c.num_microbatches for c in space.configs}):
        mb_args, mb_kwargs = first_microbatch(args, kwargs, m)
        traced = trace(model, mb_args, mb_kwargs, method=method, leaf_modules=leaf_modules)
        model_costs = resolve_cost_model(cost_model, traced, loss_fn=loss_fn,
                                             target=first_target(target, m), precision=precision)
        costed[m] = Costed(traced, model_costs.node_costs(traced), model_costs)
        log.info("auto-plan: traced and costed micro-batch size %s (%d micro-batches)",
                 batch // m if batch else "-", m)
    trials: list[Trial] = []
    skipped: list[str] = []
    with progress_bar(f"auto-plan: {len(space.configs)} configurations", total=len(space.configs),
                      enabled=None) as advance:
        for cfg in space.configs:
            try:
                trials.append(run_trial(
                    costed[cfg.num_microbatches], cfg, num_ranks=space.num_ranks, memory_limit=memory_limit,
                    device_speeds=device_speeds, strategy=strategy, batch=batch,
                    optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, precision=precision, recompute=recompute))
            except (PartitionError, ScheduleError) as exc:
                reason = " ".join(str(exc).split())
                log.info("auto-plan: %s cannot be split: %s", cfg.label, reason)
                skipped.append(f"{cfg.label}: {reason}")
            advance()
    ranked = rank_trials(trials)
    if not ranked:
        raise PartitionError(f"auto-plan: none of the {len(space.configs)} configurations could be split; "
                             f"the first says: {skipped[0]}")
    if not ranked[0].fits:
        raise none_fits_error(ranked, space.num_ranks)
    winner = ranked[0]
    data = winner.data.model_copy(update={"candidates": candidates(ranked), "chosen": 0})  # ranked: winner first
    log.info("auto-plan: chose %s (%s) of %d candidates", winner.config.label,
             format_seconds(winner.step_time), len(ranked))
    return Partitioned(data, costed[winner.config.num_microbatches].traced)


def run_trial(
    costed: Costed, cfg: Config, *, num_ranks: int, memory_limit: MemoryLimit,
    device_speeds: Sequence[float] | None, strategy: str, batch: int | None,
    optimizer_state_bytes_per_param: int, precision: str = "fp32", recompute: str = "none",
) -> Trial:
    """Split and simulate one configuration (PartitionError when it cannot be split at all)."""
    limits = config.memory_limits(memory_limit, num_ranks, costed.cost_model)
    common: dict[str, Any] = dict(
        num_stages=num_ranks * cfg.stages_per_rank, num_microbatches=cfg.num_microbatches,
        schedule=cfg.schedule, stages_per_rank=cfg.stages_per_rank, cost_model=costed.cost_model,
        device_speeds=device_speeds, strategy=strategy, batch_size=batch,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, precision=precision, recompute=recompute,
    )
    need = None
    try:
        plan = partition_traced(costed.traced, costed.node_costs, memory_limit=limits, **common)
    except PartitionError as exc:
        # split again without a limit: the step time it would have, and the memory it needs
        plan = partition_traced(costed.traced, costed.node_costs, memory_limit=[None] * num_ranks,
                                    **common)
        log.info("auto-plan: %s does not fit: %s", cfg.label, " ".join(str(exc).split()))
        chain = chain_for(costed.traced, costed.node_costs, plan.schedule, cost_model=costed.cost_model,
                              memory_limit=limits, device_speeds=device_speeds,
                              optimizer_state_bytes_per_param=optimizer_state_bytes_per_param,
                              precision=precision, recompute=recompute)
        need = min_memory_limit(chain.problem)[0]
    if "nccl" not in plan.lowered:  # its schedule failed validation for NCCL (check_runnable); auto plans for NCCL
        raise ScheduleError(f"{cfg.label}: the schedule has no valid NCCL lowering for this split")
    sim = simulate_plan(plan)
    memory = [0] * num_ranks
    for st in plan.stages:
        memory[st.rank] += st.memory_bytes
    fits = need is None and all(lim is None or used <= lim for used, lim in zip(memory, limits))
    return Trial(cfg, plan, sim.step_time, sim.bubble_fraction, tuple(memory), limits, fits,
                 max(memory) if need is None else need)


def rank_trials(trials: Sequence[Trial]) -> list[Trial]:
    """Fitting first; then by step time (equal to 9 digits ties), then peak rank memory."""
    order = {id(t): i for i, t in enumerate(trials)}
    return sorted(trials, key=lambda t: (not t.fits, float(f"{t.step_time:.9g}"), max(t.rank_memory),
                                         order[id(t)]))


def candidates(ranked: Sequence[Trial]) -> tuple[Candidate, ...]:
    """One :class:`Candidate` per trial, in ``ranked`` order, noting why each won or lost."""
    best = ranked[0]
    out = []
    for t in ranked:
        if t is best:
            note = "chosen: fastest that fits" if sum(x.fits for x in ranked) > 1 else "chosen: the only fit"
        elif t.fits:
            slower = (t.step_time / best.step_time - 1.0) * 100 if best.step_time > 0 else 0.0
            note = f"{slower:.1f}% slower" if slower >= 0.05 else "as fast, more memory"
        else:
            limit = min((lim for lim in t.limits if lim is not None), default=0)
            note = f"needs {format_bytes(t.need)}/rank > limit {format_bytes(limit)}"
        out.append(Candidate(
            schedule=t.config.schedule, num_microbatches=t.config.num_microbatches,
            stages_per_rank=t.config.stages_per_rank, step_time=t.step_time,
            bubble_fraction=t.bubble_fraction, peak_memory=t.rank_memory, fits=t.fits, note=note,
        ))
    return tuple(out)


def none_fits_error(ranked: Sequence[Trial], num_ranks: int) -> PartitionError:
    """The error for "no configuration fits", naming the closest one and what it needs."""
    closest = min(ranked, key=lambda t: (t.need, t.step_time))
    limits = sorted({lim for t in ranked for lim in t.limits if lim is not None})
    tried = sorted({t.config.schedule for t in ranked})
    counts = sorted({t.config.num_microbatches for t in ranked})
    return PartitionError(
        f"auto-plan: none of the {len(ranked)} configurations fits the memory limit "
        f"({', '.join(format_bytes(x) for x in limits)} per rank) on {num_ranks} ranks (schedules "
        f"{', '.join(tried)}; micro-batches {counts}); the closest is {closest.config.label}, which needs "
        f"{format_bytes(closest.need)} per rank. To fix: raise memory_limit to at least "
        f"{format_bytes(closest.need)}, or spread the model over more ranks (num_stages)"
    )


__all__ = [
    "AUTO",
    "INTERLEAVED_DEPTHS",
    "MICROBATCHES_PER_RANK",
    "Config",
    "Costed",
    "SearchSpace",
    "Trial",
    "candidates",
    "none_fits_error",
    "partition_auto",
    "rank_trials",
    "run_trial",
    "search_space",
]
