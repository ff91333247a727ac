"""Prediction fidelity: the simulated training step against the measured one, over a sweep.

Each case of ``_fidelity_cases.CASES`` -- models of different shapes (uniform
blocks, a heavy LM head, long and short skips, two inputs, HF GPT-2, Llama and
BERT built from configs), every schedule, M from p to 4p -- is partitioned with
the profiled cost model (``pipec.profile`` of one micro-batch with its loss, taken
on both ranks at once with one thread each, as they compute in the run -- each
figure the median of the ``--profiles`` profiles of both -- so both ranks build
the same plan) and run on 2 ranks (Gloo on 127.0.0.1, each rank
pinned to one core with one thread). Measured: the median of the timed steps (the
slowest rank's step, between barriers) after warm-up. Predicted:
``plan.simulate().step_time``. For comparison, two more predictions: ``base``, the
same simulation as pipec made it before issue #18 -- no runtime-overhead terms
(``runtime_overhead=None``) and the first stage's ``I``/``W`` split by its nodes'
times -- and ``exact F/B``, the simulation with each stage's measured
compute (median spans less the overhead the simulator adds back), which tells
the profile's error from the schedule, communication and overhead model's.

Against noise (other processes share the cores): every case's runtime is built
first, then the cases run in rounds of a few steps each, the order reversed
every round, so a slow spell of the machine falls on all cases alike; each
step records how long its ranks waited for their cores
(``/proc/thread-self/schedstat``); figures come from the quiet steps (no rank
waited more than 5% of the step) when at least 3 are, else from all. Other
processes also slow a core down without taking it (shared caches and memory
bandwidth of a 2-vCPU VM), which that wait does not show: each round's
slow-down (the median over cases of its median step over the case's overall
one) is printed, and ``--quiet-rounds`` keeps the quieter half of the rounds;
a profile taken with the other core idle ran ~5% faster than the run's
compute, so both ranks profile together (``--profile-alone``: rank 0 alone,
the smallest of its profiles, the method before). The load
average is printed before and after.

Printed: per case the measured and predicted step and the error; then the mean
absolute error, the worst case and the Spearman rank correlation (goal: <= 10%,
<= 20%, >= 0.95); per stage the forward and backward per micro-batch,
predicted against the medians of ``pipe.timeline()``; per rank the peak memory
(measured on CUDA only: CPU ranks share the host's allocator); with
``--attribute`` where the difference goes (per action kind, and outside the
schedule's actions).

Run (about 1-2 minutes on a 2-core box; ``--quick`` well under one)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity.py [--quick] [--cases gpt2,zb]
        [--rounds 6] [--steps 3] [--profiles 3] [--hardware cost_models/mybox.json]
        [--device cuda] [--attribute] [--quiet-rounds] [--save run.json | --load run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _fidelity_cases import CASES, MODELS, QUICK, Case  # noqa: E402
from _two_ranks import Step, run_two, timed_step  # noqa: E402

QUIET = 0.05  # a step is quiet when no rank waited for its core more than this share of it


# -- the ranks --------------------------------------------------------------------------


def _profiles(rank: int, cases: Sequence[Case], device: str, profiles: int, alone: bool) -> dict[str, str]:
    """One profile per model (JSON), the same on both ranks.

    Default: both ranks profile at once, as both compute in the run -- a profile
    taken while the other core idles runs ~5% faster (the cores share caches and
    memory bandwidth) and every prediction came out that much low -- and each
    figure is the median over the ``profiles`` profiles of both ranks. ``alone``:
    rank 0 profiles with rank 1 waiting, each figure the smallest of its profiles
    (the method before)."""
    import pipec
    from pipec.partitioner.inputs import first_microbatch, first_target
    from pipec.profiling import Profile

    out: dict[str, str] = {}
    for name in dict.fromkeys(c.model for c in cases):
        found: list[Any] = []
        if rank == 0 or not alone:
            model = MODELS[name]
            args, kwargs, target = model.batch(1)
            mb_args, mb_kwargs = first_microbatch(args, kwargs, 1)
            traced = pipec.trace(model.build(), mb_args, mb_kwargs, method=model.method)
            found = [pipec.profile(traced, device=device, progress=False, loss_fn=model.loss_fn,
                                   target=first_target(target, 1)).model_dump_json() for _ in range(profiles)]
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, found)
        every = [Profile.model_validate_json(j) for got in gathered for j in got]
        out[name] = (smallest(every) if alone else typical(every)).model_dump_json()
    return out


def _combine(costs: Sequence[Any], pick: Any) -> Any:
    fields = ("forward_time", "input_grad_time", "weight_grad_time")
    return costs[0].model_copy(update={f: pick([getattr(c, f) for c in costs]) for f in fields})


def _each_figure(profiles: Sequence[Any], pick: Any) -> Any:
    first = profiles[0]
    loss = None if first.loss is None else _combine([p.loss for p in profiles], pick)
    return first.model_copy(update={
        "forward_time": pick([p.forward_time for p in profiles]),
        "forward_backward_time": pick([p.forward_backward_time for p in profiles]),
        "nodes": {n: _combine([p.nodes[n] for p in profiles], pick) for n in first.nodes},
        "loss": loss,
    })


def smallest(profiles: Sequence[Any]) -> Any:
    """One profile of the smallest value of every time over ``profiles`` of one graph."""
    return _each_figure(profiles, min)


def typical(profiles: Sequence[Any]) -> Any:
    """One profile of the median of every time over ``profiles`` of one graph."""
    return _each_figure(profiles, statistics.median)


def _plan(case: Case, profile_json: str, hardware: str | None) -> Any:
    import pipec
    from pipec.costs.hardware import load_hardware
    from pipec.costs.profiled import ProfiledCostModel
    from pipec.profiling import Profile

    model = MODELS[case.model]
    args, kwargs, target = model.batch(case.num_microbatches)
    spec = load_hardware(hardware) if hardware else None
    cost_model = ProfiledCostModel(Profile.model_validate_json(profile_json), spec=spec)
    return pipec.partition(
        model.build(), args, example_kwargs=kwargs, num_stages=2 * case.stages_per_rank,
        num_microbatches=case.num_microbatches, schedule=case.schedule,
        stages_per_rank=case.stages_per_rank, loss_fn=model.loss_fn, cost_model=cost_model,
        target=target, method=model.method,
    )


def worker(rank: int, port: int, args: argparse.Namespace, cases: Sequence[Case], out: Any) -> None:
    from pipec.runtime.runtime import PipelineRuntime

    os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    device = args.device if args.device == "cpu" else f"{args.device}:0"
    profiles = _profiles(rank, cases, device, args.profiles, args.profile_alone)
    plans, runners, batches = {}, {}, {}
    for case in cases:
        plans[case.name] = _plan(case, profiles[case.model], args.hardware)
        runners[case.name] = PipelineRuntime(plans[case.name], loss_fn=MODELS[case.model].loss_fn, device=device)
        batches[case.name] = MODELS[case.model].batch(case.num_microbatches)
    steps: dict[str, list[Step]] = {c.name: [] for c in cases}
    peak: dict[str, int | None] = {c.name: None for c in cases}
    cuda = device.startswith("cuda")
    for case in cases:
        for _ in range(args.warmup):
            timed_step(runners[case.name], batches[case.name])
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                steps[case.name].append(timed_step(runners[case.name], batches[case.name]))
            if cuda:
                peak[case.name] = max(peak[case.name] or 0, int(torch.cuda.max_memory_allocated()))
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, {"steps": steps, "peak": peak})
    if rank == 0:
        out.put({"ranks": gathered, "plans": {k: p.data.model_dump_json() for k, p in plans.items()}})
    dist.barrier()
    dist.destroy_process_group()


def launch(args: argparse.Namespace, cases: Sequence[Case]) -> dict[str, Any]:
    """Run ``worker`` on 2 forked ranks; rank 0's gathered results."""
    return dict(run_two(worker, args, cases))


# -- analysis ---------------------------------------------------------------------------


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den > 0 else float("nan")


def kept(steps: Sequence[Step], rounds: Sequence[int] | None = None, per_round: int = 1) -> list[int]:
    """The steps the figures come from: of the ``rounds`` given (all when None), the quiet
    ones (no rank waited for its core more than QUIET of the step) when 3 or more are."""
    mine = [i for i in range(len(steps)) if rounds is None or i // per_round in rounds]
    quiet = [i for i in mine if steps[i].delay <= QUIET * steps[i].slowest]
    return quiet if len(quiet) >= 3 else mine


def quiet_rounds(all_steps: Sequence[Sequence[Step]], per_round: int) -> tuple[list[int], list[float]]:
    """The quieter half of the rounds, judged by every case together: a round's factor is the
    median over cases of (the case's median step in that round / its median over all rounds).
    Other processes slow a core down without taking it (the run-queue wait misses that), and a
    slow spell slows every case of its round; the predictions play no part in the choice."""
    num_rounds = len(all_steps[0]) // per_round
    factors = []
    for r in range(num_rounds):
        ratios = []
        for steps in all_steps:
            overall = statistics.median(s.slowest for s in steps)
            ratios.append(statistics.median(s.slowest for s in steps[r * per_round:(r + 1) * per_round]) / overall)
        factors.append(statistics.median(ratios))
    cut = statistics.median(factors)
    return [r for r in range(num_rounds) if factors[r] <= cut], factors


def simulations(plan_data: Any) -> tuple[Any, Any]:
    """The plan's simulation, and as pipec made it before #18 (no runtime overhead, the
    first stage's I and W its nodes' sums)."""
    from pipec.schedule.backends import plan_lowered
    from pipec.schedule.simulator import (
        plan_collectives,
        plan_costs,
        plan_transfers,
        simulate,
        simulate_plan,
    )

    with_terms = simulate_plan(plan_data)
    costs, held = plan_costs(plan_data)
    # before #18 each stage's I and W were its nodes' sums, the first stage's too
    own = [(st.input_grad_time, st.weight_grad_time) for st in sorted(plan_data.stages, key=lambda st: st.index)]
    base = simulate(
        plan_lowered(plan_data), forward=costs.forward, comm=costs.comm, activation_bytes=held,
        input_grad=[c if i is None else i for c, (i, _) in zip(costs.input_grad, own)],
        weight_grad=[c if w is None else w for c, (_, w) in zip(costs.weight_grad, own)],
        boundaries=plan_data.boundaries, collectives=plan_collectives(plan_data), transfers=plan_transfers(plan_data),
    )
    return with_terms, base


def kind_of(text: str) -> str:
    from pipec.errors import ScheduleError
    from pipec.schedule.ir import Action

    try:
        return str(Action.parse(text).kind.value)
    except ScheduleError:
        return text


def per_stage(steps_by_rank: Sequence[Sequence[Step]], keep: Sequence[int], num_stages: int) -> dict[str, list[float]]:
    """Medians over kept steps and micro-batches: F and backward (B, or I + W) per stage."""
    from pipec.schedule.ir import Action

    fwd: dict[int, list[float]] = {s: [] for s in range(num_stages)}
    bwd: dict[int, list[float]] = {s: [] for s in range(num_stages)}
    for steps in steps_by_rank:
        for i in keep:
            back: dict[tuple[int, int], float] = {}
            for start, end, _, text in steps[i].timeline:
                if kind_of(text) not in ("F", "B", "I", "W"):
                    continue
                a = Action.parse(text)
                if a.kind.value == "F":
                    fwd[a.stage].append(end - start)
                else:
                    back[(a.stage, a.microbatch)] = back.get((a.stage, a.microbatch), 0.0) + end - start
            for (s, _), t in back.items():
                bwd[s].append(t)
    return {"F": [statistics.median(fwd[s]) if fwd[s] else 0.0 for s in range(num_stages)],
            "B": [statistics.median(bwd[s]) if bwd[s] else 0.0 for s in range(num_stages)]}


def kind_medians(steps_by_rank: Sequence[Sequence[Step]], keep: Sequence[int], num_stages: int
                 ) -> dict[str, list[float | None]]:
    """Per compute kind (F, B, I, W) and stage, the median span over kept steps and micro-batches."""
    from pipec.schedule.ir import Action

    spans: dict[tuple[str, int], list[float]] = {}
    for steps in steps_by_rank:
        for i in keep:
            for start, end, _, text in steps[i].timeline:
                if kind_of(text) in ("F", "B", "I", "W"):
                    a = Action.parse(text)
                    spans.setdefault((a.kind.value, a.stage), []).append(end - start)
    return {k: [statistics.median(spans[(k, s)]) if (k, s) in spans else None for s in range(num_stages)]
            for k in ("F", "B", "I", "W")}


def with_measured_costs(data: Any, steps_by_rank: Sequence[Sequence[Step]], keep: Sequence[int]) -> Any:
    """The plan with each stage's F, I and W replaced by the measured spans less the runtime
    overhead the simulator adds back: what the simulator predicts with exact compute costs
    (it separates the profile's error from the schedule, communication and overhead model)."""
    from pipec.schedule.simulator import split_costs
    from pipec.types import RuntimeOverhead

    o = data.runtime_overhead or RuntimeOverhead()
    split = split_costs(data)
    med = kind_medians(steps_by_rank, keep, data.num_stages)
    stages = []
    for s, st in enumerate(data.stages):
        f, b, i, w = (med[k][s] for k in ("F", "B", "I", "W"))
        forward = st.forward_time if f is None else max(0.0, f - o.forward)
        if i is not None and w is not None:
            ig, wg = max(0.0, i - o.input_grad), max(0.0, w - o.weight_grad - split[s])
        elif b is not None:
            total = max(0.0, b - o.backward)
            share = (st.input_grad_time / st.backward_time
                     if st.input_grad_time is not None and st.backward_time > 0 else 0.5)
            ig, wg = total * share, total * (1 - share)
        else:
            ig, wg = st.input_grad_time, st.weight_grad_time
        stages.append(st.model_copy(update={"forward_time": forward, "backward_time": (ig or 0.0) + (wg or 0.0),
                                            "input_grad_time": ig, "weight_grad_time": wg}))
    return data.model_copy(update={"stages": tuple(stages)})


def attribution(steps_by_rank: Sequence[Sequence[Step]], keep: Sequence[int], sim: Any) -> dict[str, float]:
    """Per action kind, the median over kept steps of (measured - simulated) summed over
    both ranks' actions of that kind, in seconds; ``outside``: the step less the span of
    the rank's actions (splitting the batch, the step's end), the mean of the ranks."""
    simulated: dict[str, float] = {}
    for e in sim.timeline:
        k = str(e.action.kind.value)
        simulated[k] = simulated.get(k, 0.0) + e.end - e.start
    out: dict[str, list[float]] = {}
    for i in keep:
        measured: dict[str, float] = {}
        outside = 0.0
        for steps in steps_by_rank:
            st = steps[i]
            for start, end, _, text in st.timeline:
                k = kind_of(text)
                measured[k] = measured.get(k, 0.0) + end - start
            span = max((e for _, e, _, _ in st.timeline), default=0.0)
            outside += (st.local - span) / len(steps_by_rank)
        for k in set(measured) | set(simulated):
            out.setdefault(k, []).append(measured.get(k, 0.0) - simulated.get(k, 0.0))
        out.setdefault("outside", []).append(outside)
    return {k: statistics.median(v) for k, v in out.items()}


# -- report -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(args: argparse.Namespace, cases: Sequence[Case], result: dict[str, Any],
           load: tuple[tuple[float, ...], tuple[float, ...]], took: float) -> None:
    from pipec.plan import PlanData

    ranks = result["ranks"]
    rounds, factors = quiet_rounds([ranks[0]["steps"][c.name] for c in cases], args.steps)
    if not args.quiet_rounds:
        rounds = list(range(len(factors)))
    rows = []
    for case in cases:
        data = PlanData.model_validate_json(result["plans"][case.name])
        by_rank = [r["steps"][case.name] for r in ranks]
        keep = kept(by_rank[0], rounds, args.steps)
        measured = statistics.median(by_rank[0][i].slowest for i in keep)
        sim, base = simulations(data)
        exact = simulations(with_measured_costs(data, by_rank, keep))[0]
        rows.append((case, data, by_rank, keep, measured, sim, base, exact))

    print(f"device {args.device}, 2 Gloo ranks x 1 core x 1 thread; torch {torch.__version__}; "
          f"{args.warmup} warm-up steps per case, then {args.rounds} rounds x {args.steps} steps, "
          f"case order reversed every round; quiet = no rank waited for its core > {QUIET:.0%} of the step")
    print(f"load average before {load[0][0]:.2f} {load[0][1]:.2f} {load[0][2]:.2f}, "
          f"after {load[1][0]:.2f} {load[1][1]:.2f} {load[1][2]:.2f}; took {took:.0f} s")
    print("rounds' slow-down (median over cases of the round's median step / the case's overall median): "
          + " ".join(f"{f:.2f}" for f in factors)
          + ("; figures from every round" if not args.quiet_rounds else
             f"; figures from the quieter half (--quiet-rounds), rounds {', '.join(str(r) for r in rounds)}"))
    print()
    head = (f"{'case':28s} {'M':>2s} {'stages':>6s} {'measured':>9s} {'quiet':>6s} {'predicted':>9s} {'err':>7s}"
            f" {'base pred':>9s} {'base err':>8s} {'exact F/B':>9s} {'err':>7s}")
    print(head + "    (ms; err = predicted / measured - 1; base = without runtime overhead; "
          "exact F/B: simulated with the measured per-stage compute)")
    for case, data, by_rank, keep, measured, sim, base, exact in rows:
        quiet = f"{len(keep)}/{len(by_rank[0])}"
        print(f"{case.name:28s} {case.num_microbatches:2d} {data.num_stages:6d} {ms(measured):>9s} {quiet:>6s} "
              f"{ms(sim.step_time):>9s} {sim.step_time / measured - 1:+7.1%} {ms(base.step_time):>9s} "
              f"{base.step_time / measured - 1:+8.1%} {ms(exact.step_time):>9s} {exact.step_time / measured - 1:+7.1%}")
    print()
    measured = [r[4] for r in rows]
    for label, idx in (("with runtime overhead", 5), ("base (before #18)", 6), ("exact F/B", 7)):
        pred = [r[idx].step_time for r in rows]
        errs = [abs(p / m - 1) for p, m in zip(pred, measured)]
        worst = max(range(len(rows)), key=lambda i: errs[i])
        ratio = statistics.median(m / p for p, m in zip(pred, measured))
        print(f"{label:22s}: mean abs error {statistics.mean(errs):6.1%}, worst {errs[worst]:6.1%} "
              f"({rows[worst][0].name}), Spearman {spearman(pred, measured):.3f}, "
              f"median measured/predicted {ratio:.3f}   (goal <= 10%, <= 20%, >= 0.95)")
    print()
    print("per stage, ms per micro-batch: predicted (plan) / measured (median of pipe.timeline() spans)")
    print(f"{'case':28s} {'stage':>5s} {'F pred':>8s} {'F meas':>8s} {'B pred':>8s} {'B meas':>8s}  peak memory per rank "
          "(predicted / measured)")
    for case, data, by_rank, keep, _, sim, _, _ in rows:
        stats = per_stage(by_rank, keep, data.num_stages)
        peaks = [r["peak"][case.name] for r in ranks]
        memory = ", ".join(
            f"rank {k}: {p / 2**20:.1f} / " + ("n/a (CPU)" if m is None else f"{m / 2**20:.1f}") + " MiB"
            for k, (p, m) in enumerate(zip(sim.peak_memory, peaks)))
        for s, st in enumerate(data.stages):
            print(f"{case.name if s == 0 else '':28s} {s:5d} {ms(st.forward_time):>8s} {ms(stats['F'][s]):>8s} "
                  f"{ms(st.backward_time):>8s} {ms(stats['B'][s]):>8s}  {memory if s == 0 else ''}")
    if args.attribute:
        print()
        print("where measured - predicted goes, ms per step (sums over both ranks' actions of a kind; "
              "RECV: waiting included; outside: before the first action and after the last, mean of ranks)")
        kinds = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "outside")
        print(f"{'case':28s} {'diff':>7s} " + " ".join(f"{k:>7s}" for k in kinds))
        for case, _, by_rank, keep, measured_step, sim, _, _ in rows:
            att = attribution(by_rank, keep, sim)
            print(f"{case.name:28s} {ms(measured_step - sim.step_time):>7s} "
                  + " ".join(f"{ms(att[k]) if k in att else '-':>7s}" for k in kinds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to keep")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profiles", type=int, default=3,
                    help="profiles per model on each rank; each figure is the median over both ranks' "
                         "(with --profile-alone: rank 0's smallest)")
    ap.add_argument("--profile-alone", action="store_true",
                    help="profile on rank 0 with rank 1 idle, each figure the smallest (the method before)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--hardware", help="a hardware file (cost_models/ name or path) for the link "
                    "and runtime-overhead figures; default: the cpu file")
    ap.add_argument("--attribute", action="store_true", help="also print where the difference goes")
    ap.add_argument("--quiet-rounds", action="store_true",
                    help="figures from the quieter half of the rounds, judged by all cases together (default: all)")
    ap.add_argument("--save", metavar="PATH", help="also write every timed step and every plan as JSON")
    ap.add_argument("--load", metavar="PATH", help="report on a run saved with --save (runs nothing)")
    args = ap.parse_args()
    cases = [c for c in CASES if (not args.quick or c.name in QUICK)
             and (not args.cases or any(s in c.name for s in args.cases.split(",")))]
    if not cases:
        ap.error(f"no case matches; the cases are {', '.join(c.name for c in CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        cases = [c for c in cases if c.name in saved["plans"]]
        result = {"plans": saved["plans"],
                  "ranks": [{"peak": r["peak"], "steps": {k: [Step(**s) for s in v] for k, v in r["steps"].items()}}
                            for r in saved["ranks"]]}
        report(args, cases, result, (os.getloadavg(), os.getloadavg()), 0.0)
        return 0
    before, started = os.getloadavg(), time.perf_counter()
    result = launch(args, cases)
    if args.save:
        Path(args.save).write_text(json.dumps(
            {"plans": result["plans"],
             "ranks": [{"peak": r["peak"], "steps": {k: [s._asdict() for s in v] for k, v in r["steps"].items()}}
                       for r in result["ranks"]]}))
    report(args, cases, result, (before, os.getloadavg()), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
