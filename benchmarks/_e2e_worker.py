"""The ranks' side of ``benchmarks/e2e.py``: plans, timed steps, the timelines.

Each rank is pinned to one core with one thread. Rank 0 profiles one
micro-batch (the ranks' threading) and sends the profile to rank 1, so both
build the same two plans from the same numbers. Both plans' runtimes then run
alternating pairs of timed steps; every step records the slowest rank's time,
this rank's timeline (``pipe.timeline()``) and, per action, the time another
process held this rank's core (``/proc/thread-self/schedstat``: the run-queue
wait), so a disturbed step can be told from a quiet one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pipec.runtime.timeline import Clock

ROOT = Path(__file__).resolve().parent.parent
PLANS = ("auto", "equal-blocks")
SCHEDULE = "1f1b"
QUIET = 0.02  # a step is quiet when no rank waited for its core more than this share of it

Report = Callable[[list[dict[str, Any]], dict[str, Any], tuple[float, float]], None]


def load_gpt2_example() -> Any:
    """``examples/gpt2.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("pipec_example_gpt2", ROOT / "examples" / "gpt2.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {ROOT / 'examples' / 'gpt2.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- plans ----------------------------------------------------------------------------


def first_node_of_block(traced: Any, block: int) -> str:
    """The first compute node of ``transformer.h.{block}``: where the second stage starts."""
    from pipec.partitioner.graph import compute_names

    prefix = f"transformer.h.{block}"
    compute = set(compute_names(traced))
    for n in traced.nodes:
        if n.name in compute and (n.module_path == prefix or n.module_path.startswith(prefix + ".")):
            return str(n.name)
    raise SystemExit(f"no compute node of {prefix} in the traced graph")


def build_plans(rank: int, args: argparse.Namespace, made: dict[str, Any]) -> dict[str, Any]:
    """Both plans, identical on every rank: rank 0 profiles, rank 1 receives the profile."""
    import pipec
    from pipec.costs.profiled import ProfiledCostModel
    from pipec.partitioner.assemble import plan_from_split
    from pipec.partitioner.inputs import first_microbatch, first_target
    from pipec.profiling import Profile

    model, inputs, loss_fn = made["model"], made["example_inputs"], made["loss_fn"]
    box: list[Any] = [None, 0.0, 0.0]
    if rank == 0:
        mb_args, _ = first_microbatch(inputs, {}, args.microbatches)
        traced = pipec.trace(model, mb_args)
        for _ in range(3):  # a profile taken while other processes held the core is redone
            started, delayed = time.perf_counter(), run_delay()
            profile_json = pipec.profile(traced, progress=False, loss_fn=loss_fn,
                                         target=first_target(made["target"], args.microbatches)).model_dump_json()
            took = [profile_json, time.perf_counter() - started, run_delay() - delayed]
            if box[0] is None or took[2] / took[1] < box[2] / box[1]:
                box = took
            if box[2] <= QUIET * box[1]:
                break
    dist.broadcast_object_list(box, src=0)
    profile = Profile.model_validate_json(box[0])
    # cost_model="profile" is ProfiledCostModel(pipec.profile(traced, loss_fn=..., target=...));
    # made once, on rank 0
    cost_model = ProfiledCostModel(profile)
    auto = pipec.partition(
        model, inputs, num_stages=2, num_microbatches=args.microbatches, schedule=SCHEDULE,
        loss_fn=loss_fn, cost_model=cost_model, strategy="optimal",
    )
    equal = pipec.Plan(plan_from_split(
        auto.traced, auto.node_costs, [first_node_of_block(auto.traced, args.layers // 2)],
        schedule=SCHEDULE, num_microbatches=args.microbatches, cost_model=cost_model,
        batch_size=args.batch,
    ), traced=auto.traced, loss_fn=loss_fn)
    plans = {"auto": auto, "equal-blocks": equal}
    splits = [[list(st.nodes) for st in p.stages] for p in plans.values()]
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, splits)
    if gathered[0] != gathered[1]:
        raise SystemExit("the ranks built different plans from the same profile")
    loss = None if profile.loss is None else (profile.loss.forward_time, profile.loss.backward_time)
    return {"plans": plans, "profile_time": (float(box[1]), float(box[2])), "profile_loss": loss}


# -- measuring ------------------------------------------------------------------------


def run_delay() -> float:
    """Seconds this thread has waited on a run queue: time other processes took from its core."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) * 1e-9


class StolenTimeClock(Clock):
    """The runtime's clock, also noting per action how long the rank waited for
    its core (another process ran there): an action's compute time is its
    duration less that wait."""

    def begin(self) -> None:
        super().begin()
        self.stolen: list[float] = []

    def start(self) -> Any:
        return super().start(), run_delay()

    def stop(self, started: Any, text: str) -> None:
        wall, delayed = started
        self.stolen.append(run_delay() - delayed)
        super().stop(wall, text)


class Step(NamedTuple):
    slowest: float  # the slowest rank's step time
    local: float  # this rank's step time
    timeline: list[tuple[float, float, int, str]]  # this rank's actions
    stolen: list[float]  # per action of the timeline, time another process held the core
    delay: float  # the most any rank waited for its core during the step


def timed_step(pipe: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, Any]:
    """One training step between barriers, and its loss (last rank)."""
    for p in pipe.parameters():
        p.grad = None
    dist.barrier()
    d0 = run_delay()
    t0 = time.perf_counter()
    loss = pipe.step(x, target=y)
    local = time.perf_counter() - t0
    worst = torch.tensor([local, run_delay() - d0])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    stolen = list(pipe._executor.clock.stolen)
    return Step(float(worst[0]), local, pipe.timeline(), stolen, float(worst[1])), loss


def grad_norms(pipe: Any) -> dict[str, float]:
    return {n: float(p.grad.double().norm()) for n, p in pipe.named_parameters() if p.grad is not None}


def check_same_gradients(runners: dict[str, Any], losses: dict[str, Any]) -> None:
    """Both plans computed the same loss and gradients (a guard against timing a broken run)."""
    mine = {name: grad_norms(pipe) for name, pipe in runners.items()}
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, (mine, {k: None if v is None else float(v) for k, v in losses.items()}))
    if dist.get_rank() != 0:
        return
    merged: dict[str, dict[str, float]] = {name: {} for name in runners}
    for norms, _ in gathered:
        for name in runners:
            merged[name].update(norms[name])
    a, b = (merged[name] for name in PLANS)
    if set(a) != set(b):
        raise SystemExit(f"the plans hold different parameters: {sorted(set(a) ^ set(b))[:5]}")
    bad = [n for n in a if abs(a[n] - b[n]) > 1e-3 * max(abs(a[n]), 1e-6)]
    last = gathered[1][1]
    if bad or abs(last["auto"] - last["equal-blocks"]) > 1e-4 * abs(last["auto"]):
        raise SystemExit(f"the plans disagree: losses {last}, gradient norms differ for {bad[:5]}")


def loss_time(made: dict[str, Any], args: argparse.Namespace, repeats: int = 7) -> tuple[float, float]:
    """Median forward and backward time of the loss on one micro-batch of logits."""
    mb = args.batch // args.microbatches
    logits = torch.randn(mb, args.seq, args.vocab, requires_grad=True)
    target = made["target"][:mb]
    fwd, bwd = [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = made["loss_fn"]({"logits": logits}, target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        logits.grad = None
        if i >= 2:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def _setup(rank: int, port: int) -> None:
    os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def worker(rank: int, port: int, args: argparse.Namespace, made: dict[str, Any], report: Report) -> None:
    """One rank: build both plans, warm up, time alternating pairs; rank 0 gets
    both ranks' results and hands them to ``report``."""
    from pipec.runtime.runtime import PipelineRuntime

    _setup(rank, port)
    built = build_plans(rank, args, made)
    plans = built["plans"]
    runners = {name: PipelineRuntime(plans[name], loss_fn=made["loss_fn"]) for name in PLANS}
    for pipe in runners.values():  # a benchmark-only hook: the executor's clock, with stolen time
        pipe._executor.clock = StolenTimeClock(pipe.device)
    x, y = made["example_inputs"][0], made["target"]
    losses: dict[str, Any] = {}
    for _ in range(args.warmup):
        for name in PLANS:
            losses[name] = timed_step(runners[name], x, y)[1]
    check_same_gradients(runners, losses)
    # Pairs until --pairs of them are quiet (no rank lost its core to another
    # process for more than QUIET of a step) or --budget seconds have passed.
    steps: dict[str, list[Step]] = {name: [] for name in PLANS}
    started, quiet = time.perf_counter(), 0
    while True:
        order = PLANS if len(steps["auto"]) % 2 == 0 else PLANS[::-1]
        pair = {name: timed_step(runners[name], x, y)[0] for name in order}
        for name in PLANS:
            steps[name].append(pair[name])
        quiet += all(st.delay <= QUIET * st.slowest for st in pair.values())
        more = torch.tensor([quiet < args.pairs and time.perf_counter() - started < args.budget])
        dist.broadcast(more, src=0)  # rank 0's clock decides for both
        if not more.item():
            break
    result: dict[str, Any] = {"rank": rank, "steps": steps, "profile_loss": built["profile_loss"]}
    if rank == 1:
        result["loss_time"] = loss_time(made, args)
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        report(gathered, plans, built["profile_time"])
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
