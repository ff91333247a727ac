"""End to end: pipec's automatic split of a GPT-2 with a heavy LM head against equal blocks.

The model is ``examples/gpt2.py`` (random weights) with a vocabulary large
enough that the tied LM head costs about as much as all transformer blocks
together. Two plans of the same traced graph and the same node costs run on
pipec's runtime, 2 Gloo ranks each pinned to one core with one thread, 1F1B,
the same micro-batches: 8 of 2 sequences each. (With 4, the fill, the drain
and the tied-gradient all-reduce -- ~150 ms that no split changes -- were a
quarter of the step, and the best split could only reach ~1.2x on equal
blocks; pipelines run with several micro-batches per stage for that reason.)

- auto: ``pipec.partition(..., num_stages=2, strategy="optimal")`` costed by
  a profile of one micro-batch and its loss -- what ``cost_model="profile"``
  with ``loss_fn`` and ``target`` does (``ProfiledCostModel(pipec.profile(traced,
  loss_fn=..., target=...))``), made once, on rank 0's core with one thread,
  and sent to rank 1 so both build the same plan;
- equal-blocks: what users place by hand -- the embeddings and the first half
  of the transformer blocks on stage 0; the second half, the final norm and
  the LM head on stage 1 (``plan_from_split`` at ``transformer.h.{L/2}``).

Steps alternate in pairs (auto, equal), (equal, auto), ... after warm-up
steps; a step's time is the slowest rank's, between barriers. Other processes
share the two cores, so each step also records how long each rank waited for
its core (``/proc/thread-self/schedstat``); pairs are timed until ``--pairs``
of them are quiet (no rank waited more than 2% of the step) or ``--budget``
seconds have passed, and the figures come from the quiet pairs (all pairs
when fewer than 3 are quiet). Printed:

- ``speedup auto/equal-blocks``: the median over pairs of equal / auto step
  time (goal >= 1.2x);
- ``predicted/measured step``: ``plan.simulate().step_time`` over the median
  measured step (goal within +-15%);
- per stage, the plan's forward / backward time per micro-batch against the
  medians over micro-batches and steps of ``pipe.timeline()``, as measured and
  net of the time another process held the core;
- where the rest goes: waiting in RECV; the tied-gradient all-reduce after
  the schedule (``ALLREDUCE`` in ``pipe.timeline()``), measured and as the
  cost model predicts it (``plan.data.tied_groups[0].allreduce_time``); the
  rest of the step outside the actions (splitting the batch); the loss, which
  runs inside the last stage's F and B, as profiled and as timed on rank 1;
  and the simulator re-run with the measured per-stage times and all-reduce,
  which separates the compute costs from the schedule and communication model.

Run (about 1.5 minutes on a quiet 2-core box, at most ~3 minutes)::

    .venv/bin/python benchmarks/e2e.py [--pairs 15] [--budget 120] [--save steps.json]
        [--layers 6 --dim 256 --vocab 24000 --seq 128 --batch 16 --microbatches 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from _e2e_worker import PLANS, QUIET, SCHEDULE, load_gpt2_example, worker


def kind_of(text: str) -> str:
    """F, B, SEND_F, ... of a timeline entry; ALLREDUCE for the tied-gradient all-reduce."""
    from pipec.schedule.ir import Action
    from pipec.timeline_format import ALLREDUCE

    return ALLREDUCE if text == ALLREDUCE else str(Action.parse(text).kind.value)


def save_raw(path: Path, results: list[dict[str, Any]], plans: dict[str, Any], profile_time: tuple[float, float]) -> None:
    """Every timed step of both ranks, and both plans, as JSON (for a closer look)."""
    doc = {
        "profile_time": profile_time,
        "plans": {name: json.loads(plans[name].data.model_dump_json()) for name in PLANS},
        "simulated_step": {name: plans[name].simulate().step_time for name in PLANS},
        "ranks": [{"loss_time": r.get("loss_time"),
                   "steps": {name: [st._asdict() for st in r["steps"][name]] for name in PLANS}} for r in results],
    }
    path.write_text(json.dumps(doc))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(fn: Callable[..., None], *extra: Any) -> None:
    """Run ``fn(rank, port, *extra)`` on 2 forked ranks; one failing stops the other."""
    ctx = mp.get_context("fork")  # the ranks inherit the model: the same weights everywhere
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, port, *extra)) for r in range(2)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        procs[0].join(timeout=0.5)
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.terminate()  # blocked on the failed rank in a collective
            break
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise SystemExit(f"a benchmark rank failed: exit codes {codes}")


# -- report ---------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def quiet_steps(results: list[dict[str, Any]], name: str) -> list[int]:
    steps = results[0]["steps"][name]
    return [i for i, st in enumerate(steps) if st.delay <= QUIET * st.slowest]


def stage_stats(results: list[dict[str, Any]], name: str, keep: Sequence[int]) -> dict[str, list[float]]:
    """Per stage (= rank), medians over the kept steps (and micro-batches) of the
    F and B durations (``F``, ``B``), the same less the time another process held
    the core (``F net``, ``B net``), the time waiting in RECV, the tied-gradient
    all-reduce (``ALLREDUCE``, from the rank's last action's end: waiting for the
    other holder included) and the rest of the step outside the schedule's
    actions and the all-reduce (``outside``: splitting the batch)."""
    out: dict[str, list[float]] = {k: [] for k in ("F", "B", "F net", "B net", "recv", "outside", "ALLREDUCE")}
    for r in results:
        steps = [r["steps"][name][i] for i in keep]
        for kind in ("F", "B"):
            acts = [(end - start, stolen) for st in steps for (start, end, _, text), stolen
                    in zip(st.timeline, st.stolen) if kind_of(text) == kind]
            out[kind].append(statistics.median(d for d, _ in acts))
            out[f"{kind} net"].append(statistics.median(d - x for d, x in acts))
        out["recv"].append(statistics.median(
            sum(e - b for b, e, _, text in st.timeline if "RECV" in text) for st in steps))
        out["ALLREDUCE"].append(statistics.median(
            sum(e - b for b, e, _, text in st.timeline if kind_of(text) == "ALLREDUCE") for st in steps))
        out["outside"].append(statistics.median(st.local - (st.timeline[-1][1] - st.timeline[0][0]) for st in steps))
    return out


def simulate_with(plan: Any, forward: Sequence[float], backward: Sequence[float],
                  allreduce: float | None = None) -> float:
    """The plan's simulated step with these per-stage compute times, its own comm
    model and its tied-gradient all-reduce (``allreduce`` seconds in its place, if given)."""
    from pipec.schedule.lowering import lower
    from pipec.schedule.simulator import plan_collectives, plan_costs, plan_transfers, simulate

    costs, _ = plan_costs(plan.data)
    collectives = plan_collectives(plan.data)
    if allreduce is not None:
        collectives = tuple(c._replace(duration=allreduce) for c in collectives)
    sim = simulate(lower(plan.schedule, plan.boundaries), forward=forward, input_grad=backward,
                   weight_grad=0.0, comm=costs.comm, boundaries=plan.boundaries, collectives=collectives,
                   transfers=plan_transfers(plan.data))
    return sim.step_time


def stage_span(plan: Any, stage: int) -> str:
    paths = {n.name: n.module_path or "(root)" for n in plan.traced.nodes}
    names = plan.stages[stage].nodes
    return f"{paths[names[0]]} … {paths[names[-1]]} ({len(names)} nodes)"


def report(args: argparse.Namespace, results: list[dict[str, Any]], plans: dict[str, Any],
           profile_time: tuple[float, float]) -> None:
    steps = {name: results[0]["steps"][name] for name in PLANS}
    quiet = sorted(set(quiet_steps(results, "auto")) & set(quiet_steps(results, "equal-blocks")))
    total = len(steps["auto"])
    keep = quiet if len(quiet) >= 3 else list(range(total))
    kept = "quiet pairs" if keep is quiet else "pairs (too few quiet ones)"
    med = {name: statistics.median(steps[name][i].slowest for i in keep) for name in PLANS}
    ratios = [steps["equal-blocks"][i].slowest / steps["auto"][i].slowest for i in keep]
    all_ratios = [e.slowest / a.slowest for a, e in zip(steps["auto"], steps["equal-blocks"])]
    sims = {name: plans[name].simulate().step_time for name in PLANS}
    stats = {name: stage_stats(results, name, keep) for name in PLANS}
    delay = statistics.median(st.delay / st.slowest for name in PLANS for st in steps[name])

    print(f"model: GPT-2, {args.layers} layers, dim {args.dim}, vocab {args.vocab} (tied LM head), seq {args.seq}, "
          f"batch {args.batch}, {args.microbatches} micro-batches, {SCHEDULE}, 2 Gloo ranks x 1 core x 1 thread")
    print(f"profile of one micro-batch on rank 0 (1 thread): {profile_time[0]:.1f} s, "
          f"{profile_time[1] / profile_time[0]:.0%} of it waiting for the core (other processes)")
    for name in PLANS:
        print(f"  {name:13s} stage 0: {stage_span(plans[name], 0)} | stage 1: {stage_span(plans[name], 1)}")
    print(f"{args.warmup} warm-up steps per plan excluded; {total} alternating pairs, {len(quiet)} quiet "
          f"(no rank waited for its core > {QUIET:.0%} of the step; median wait {delay:.1%}); "
          f"figures below from the {len(keep)} {kept}")
    print()
    print(f"step time (median)   auto {ms(med['auto']).strip()} ms   equal-blocks {ms(med['equal-blocks']).strip()} ms")
    print(f"speedup auto/equal-blocks: {speedup_text(ratios)} (median of {len(ratios)} {kept}; "
          f"all {len(all_ratios)} pairs: {statistics.median(all_ratios):.2f}x; "
          f"predicted {sims['equal-blocks'] / sims['auto']:.2f}x)  goal >= 1.2x")
    fastest = {name: min(st.slowest for st in steps[name]) for name in PLANS}
    print(f"fastest steps (least disturbed): auto {ms(fastest['auto'])} ms, equal-blocks "
          f"{ms(fastest['equal-blocks'])} ms, ratio {fastest['equal-blocks'] / fastest['auto']:.2f}x, "
          f"predicted/fastest auto {sims['auto'] / fastest['auto']:.3f}")
    for name in PLANS:
        goal = "  goal 0.85..1.15" if name == "auto" else ""
        print(f"predicted/measured step ({name}): {sims[name] / med[name]:.3f}  "
              f"({ms(sims[name]).strip()} / {ms(med[name]).strip()} ms){goal}")
    print()
    print("per stage, ms per micro-batch: predicted (plan.stages) / measured (medians over micro-batches and steps")
    print("of pipe.timeline()); 'net' = measured less the time another process held the core")
    print(f"{'plan':13s} {'stage':>5s} {'fwd pred':>9s} {'meas':>7s} {'net':>7s} {'p/net':>6s} "
          f"{'bwd pred':>9s} {'meas':>7s} {'net':>7s} {'p/net':>6s}  per step: {'recv wait':>9s} {'all-red.':>8s}")
    for name in PLANS:
        st, sx = plans[name].stages, stats[name]
        for s in range(2):
            f, b = st[s].forward_time, st[s].backward_time
            print(f"{name:13s} {s:5d} {ms(f):>9s} {ms(sx['F'][s]):>7s} {ms(sx['F net'][s]):>7s} {f / sx['F net'][s]:6.2f} "
                  f"{ms(b):>9s} {ms(sx['B'][s]):>7s} {ms(sx['B net'][s]):>7s} {b / sx['B net'][s]:6.2f}  "
                  f"{'':10s} {ms(sx['recv'][s]):>9s} {ms(sx['ALLREDUCE'][s]):>8s}")
    print()
    loss_f, loss_b = results[1]["loss_time"]
    profiled = results[0]["profile_loss"]  # (forward, backward) seconds, or None
    print(f"loss (cross-entropy over {args.vocab} logits, one micro-batch; runs inside stage 1's F and B, "
          f"costed on its last node): timed on rank 1 fwd {ms(loss_f).strip()} ms, bwd {ms(loss_b).strip()} ms; "
          + ("not profiled" if profiled is None else
             f"profiled fwd {ms(profiled[0]).strip()} ms, bwd {ms(profiled[1]).strip()} ms"))
    print("tied-gradient all-reduce (lm_head.weight = transformer.wte.weight, "
          f"{plans['auto'].data.tied_groups[0].num_bytes / 1e6:.1f} MB) after the schedule, on the rank "
          "that finishes last (the other waits there for it): "
          + ", ".join(f"{name} {ms(min(stats[name]['ALLREDUCE']))} ms" for name in PLANS)
          + f"; predicted {ms(plans['auto'].data.tied_groups[0].allreduce_time)} ms")
    print("the rest of the step, before the first action and after the all-reduce (splitting the batch), "
          "not in the simulator: " + ", ".join(
              f"{name} {ms(statistics.median(stats[name]['outside']))} ms" for name in PLANS))
    for name in PLANS:
        sx = stats[name]
        wall = simulate_with(plans[name], sx["F"], sx["B"], min(sx["ALLREDUCE"]))
        net = simulate_with(plans[name], sx["F net"], sx["B net"], min(sx["ALLREDUCE"]))
        print(f"simulator with the measured per-stage F/B and all-reduce ({name}): {ms(wall).strip()} ms "
              f"(/ measured {wall / med[name]:.3f}); with net F/B {ms(net).strip()} ms")


def speedup_text(ratios: Sequence[float]) -> str:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{statistics.median(ratios):.2f}x [quartiles {q[0]:.2f}..{q[2]:.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=24000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=15, help="quiet pairs to collect (default 15)")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds of timed pairs at most, quiet or not (default 120)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per plan first (default 3)")
    ap.add_argument("--save", metavar="PATH", help="also write every timed step and both plans as JSON")
    args = ap.parse_args()
    if args.pairs < 1 or args.batch % args.microbatches:
        ap.error("expected --pairs >= 1 and --microbatches dividing --batch")

    torch.set_num_threads(1)
    os.environ.update(GPT2_LAYERS=str(args.layers), GPT2_DIM=str(args.dim), GPT2_VOCAB=str(args.vocab),
                      GPT2_SEQ=str(args.seq), GPT2_BATCH=str(args.batch))
    # Built here, before forking, so both ranks hold the same weights; this process
    # runs no autograd (CUDA builds of torch forbid it before a fork).
    made = load_gpt2_example().make()
    launch(worker, args, made, functools.partial(finish, args))
    return 0


def finish(args: argparse.Namespace, results: list[dict[str, Any]], plans: dict[str, Any],
           profile_time: tuple[float, float]) -> None:
    """On rank 0, with both ranks' results: save them if asked, print the report."""
    if args.save:
        save_raw(Path(args.save), results, plans, profile_time)
    report(args, results, plans, profile_time)


if __name__ == "__main__":
    sys.exit(main())
