"""pipec's V schedule against torch's ``ScheduleZBVZeroBubble``: same model, same split, 2 Gloo ranks.

The model is a stack of identical residual MLP blocks (``x + fc2(gelu(fc1(x)))``)
cut into 4 equal stages placed in a V on 2 ranks (rank 0: stages 0 and 3,
rank 1: stages 1 and 2), each rank pinned to one core with one thread.
Contenders, each on the same weights and micro-batches:

- ``torch-zbv``: torch.distributed.pipelining's ``ScheduleZBVZeroBubble`` on
  ``PipelineStage`` s of the same blocks (torch's runtime);
- ``pipec-<schedule>``: pipec's runtime with the schedule named by ``--schedule``
  (default ``zb-v``). Until pipec has that generator, the script says so and
  runs torch's own ZBV order instead, read into a pipec Schedule with
  ``pipec.schedule.from_torch_csv`` (``pipec-torch-zbv-order``): the same
  schedule on pipec's runtime;
- ``pipec-synth``: pipec's schedule built from the split's own costs
  (``pipec.schedule.synth``), when this pipec has it;
- ``torch-runs-pipec-plan`` (``--no-export`` leaves out these two): the first pipec
  plan exported with ``pipec.export_torch`` and run by torch's ``_PipelineScheduleRuntime``
  as pipec lowered it (``pipeline_order.csv``); ``torch-lowers-pipec-plan``: the same
  compute order lowered by torch itself (``pipeline_order_compute.csv``). Against
  ``torch-zbv`` they separate the schedule (compute order), the lowering (where each
  receive is posted) and the runtime.

Every contender's gradients are checked against ``torch-zbv``'s before timing.
Steps go in rounds, one step of each contender in an order that rotates every
round, so machine noise hits all; a step's time is the slowest rank's, between
barriers. Printed: each contender's median step time and the median over
rounds of its ratio to ``torch-zbv`` (goal for pipec's zb-v: <= 1.0).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/schedules_vs_torch.py [--schedule zb-v] [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import ResMLP, mse
from torch import nn

NUM_STAGES = 4  # in a V on 2 ranks
PLACEMENT = (0, 1, 1, 0)




def first_block(stage: int, args: argparse.Namespace) -> int:
    return stage * args.blocks // NUM_STAGES


# -- pipec's plans ---------------------------------------------------------------------


def pipec_plan(model: ResMLP, schedule: Any, args: argparse.Namespace) -> Any:
    """pipec's plan of ``model``: the 4 equal stages, ``schedule`` (a name or a
    Schedule), costed by the analytic model of ``cost_models/cpu.json``."""
    import pipec
    from pipec.partitioner.assemble import plan_from_split

    traced = pipec.trace(model, (torch.randn(args.batch // args.microbatches, args.dim),))
    cost_model = pipec.load_cost_model("cpu")
    starts = [next(n.name for n in traced.nodes if n.module_path.startswith(f"blocks.{first_block(s, args)}."))
              for s in range(1, NUM_STAGES)]
    data = plan_from_split(traced, cost_model.node_costs(traced), starts, schedule=schedule,
                           num_microbatches=args.microbatches, stages_per_rank=2, cost_model=cost_model,
                           optimizer_state_bytes_per_param=0, batch_size=args.batch)
    if tuple(data.schedule.placement) != PLACEMENT:
        raise SystemExit(f"schedule {data.schedule.name!r} places the stages {data.schedule.placement}, "
                         f"not in the V {PLACEMENT} torch's ZBV uses: not the same split")
    return pipec.Plan(data, traced=traced, loss_fn=mse)


def pipec_schedule(name: str, args: argparse.Namespace, torch_order_csv: Path) -> tuple[str, Any, str]:
    """(label, schedule, note): pipec's schedule ``name``, or -- when this pipec has no
    such generator -- torch's ZBV order read from ``torch_order_csv`` as the stand-in."""
    import pipec
    from pipec.schedule.torch_csv import from_torch_csv

    try:
        sched = pipec.make_schedule(name, NUM_STAGES, args.microbatches, stages_per_rank=2)
        return f"pipec-{name}", sched, ""
    except pipec.PipecError as exc:
        note = (f"pipec has no {name!r} schedule here ({str(exc).splitlines()[0][:120]}...); stand-in: torch's "
                "ZBV order read with pipec.schedule.from_torch_csv, run by pipec's runtime")
        return "pipec-torch-zbv-order", from_torch_csv(torch_order_csv, name="torch-zbv-order"), note


def synth_schedule(base: Any) -> Any:
    """pipec's ``synth`` schedule for the split of plan ``base`` (its zb-v plan): built from
    the stages' own F, I, W and transfer times, each stage holding at most what zb-v
    holds, as ``partition(schedule="synth")`` builds it -- here for the same split.
    Raises ImportError when this pipec has no synth."""
    import importlib

    from pipec.schedule.in_flight import in_flight_from_schedule
    from pipec.schedule.simulator import plan_costs, plan_transfers

    synthesize = importlib.import_module("pipec.schedule.synth").synthesize  # absent before issue #17's synth

    data = base.data
    costs, held = plan_costs(data)
    return synthesize(
        data.num_stages, data.num_microbatches, data.stages_per_rank,
        forward=costs.forward, input_grad=costs.input_grad, weight_grad=costs.weight_grad,
        comm=costs.comm, transfers=plan_transfers(data), boundaries=data.boundaries,
        max_in_flight=in_flight_from_schedule(data.schedule), activation_bytes=held,
    ).schedule


# -- the contenders ---------------------------------------------------------------------


class Runner:
    """One contender's step on this rank, and its parameters by original FQN."""

    name: str
    named: dict[str, nn.Parameter]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.named.values():
            p.grad = None


class TorchZBV(Runner):
    def __init__(self, model: ResMLP, rank: int, args: argparse.Namespace) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleZBVZeroBubble

        self.name, self.rank = "torch-zbv", rank
        blocks = list(copy.deepcopy(model).blocks)
        self.named = {}
        stages = []
        for s in (rank, NUM_STAGES - 1 - rank):  # torch's V: stage s on rank s, then back
            lo, hi = first_block(s, args), first_block(s + 1, args)
            part = nn.Sequential(*blocks[lo:hi])
            self.named.update({f"blocks.{lo + int(n.split('.')[0])}.{n.split('.', 1)[1]}": p
                               for n, p in part.named_parameters()})
            stages.append(PipelineStage(part, s, NUM_STAGES, torch.device("cpu")))
        self.sched = ScheduleZBVZeroBubble(stages, n_microbatches=args.microbatches, loss_fn=mse)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.rank == 0:  # stages 0 and 3: the input and the target
            self.sched.step(x, target=y, losses=[])
        else:
            self.sched.step()


class PipecRuntime(Runner):
    def __init__(self, name: str, plan: Any) -> None:
        from pipec.runtime.runtime import PipelineRuntime

        self.name = name
        self.pipe = PipelineRuntime(plan, loss_fn=mse)
        self.named = dict(self.pipe.named_parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.pipe.step(x, target=y)


class TorchRunsPipecPlan(Runner):
    def __init__(self, export: Path, rank: int, form: str) -> None:
        from pipec.runtime.torch_pipeline import load_torch_pipeline

        self.name = "torch-runs-pipec-plan" if form == "compute_comms" else "torch-lowers-pipec-plan"
        self.rank = rank
        self.sched = load_torch_pipeline(export, loss_fn=mse, form=form)
        self.named = {n: p for s in self.sched._stages for n, p in s.submod.stage.named_parameters()}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.rank == 0:
            self.sched.step(x, target=y, losses=[])
        else:
            self.sched.step()


# -- measuring --------------------------------------------------------------------------


def timed_step(runner: Runner, x: torch.Tensor, y: torch.Tensor) -> float:
    runner.zero_grad()
    dist.barrier()
    t0 = time.perf_counter()
    runner.step(x, y)
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def check_grads(runners: list[Runner], x: torch.Tensor, y: torch.Tensor) -> None:
    """Every contender's gradients on this rank equal torch-zbv's (after one step each)."""
    for r in runners:
        timed_step(r, x, y)
    ref = runners[0].named
    for r in runners[1:]:
        if set(r.named) != set(ref):
            raise SystemExit(f"{r.name} holds {sorted(r.named)[:4]}..., torch-zbv {sorted(ref)[:4]}...: not the same split")
        for n, p in ref.items():
            torch.testing.assert_close(r.named[n].grad, p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=n, r=r: f"{r.name} vs torch-zbv, {n}: {m}")


def worker(rank: int, port: int, args: argparse.Namespace, model: ResMLP, workdir: str, out: Any) -> None:
    os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import pipec

    torch_zbv = TorchZBV(model, rank, args)
    order = Path(workdir) / f"torch_zbv_order_rank{rank}.csv"
    torch_zbv.sched._dump_csv(str(order), format="compute_only")
    label, sched, note = pipec_schedule(args.schedule, args, order)
    plan = pipec_plan(model, sched, args)
    runners: list[Runner] = [torch_zbv, PipecRuntime(label, plan)]
    notes = [note] if note else []
    try:
        runners.append(PipecRuntime("pipec-synth", pipec_plan(model, synth_schedule(plan), args)))
    except (ImportError, TypeError, pipec.PipecError) as exc:  # no synth here, or another signature
        notes.append(f"pipec-synth left out: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    if not args.no_export:
        export = Path(workdir) / "export"
        if rank == 0:
            pipec.export_torch(plan, export)
        dist.barrier()
        runners += [TorchRunsPipecPlan(export, rank, form) for form in ("compute_comms", "compute_only")]
    torch.manual_seed(1)
    x, y = torch.randn(args.batch, args.dim), torch.randn(args.batch, args.dim)
    for _ in range(args.warmup):
        for r in runners:
            timed_step(r, x, y)
    check_grads(runners, x, y)
    rounds = []
    for i in range(args.rounds):
        order_i = runners[i % len(runners):] + runners[: i % len(runners)]
        rounds.append({r.name: timed_step(r, x, y) for r in order_i})
    if rank == 0:
        out.put((rounds, notes, [r.name for r in runners]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default="zb-v", help="pipec's fixed schedule to compare (default zb-v)")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-export", action="store_true", help="leave out torch running pipec's exported plan")
    args = ap.parse_args()
    if args.blocks % NUM_STAGES:
        ap.error(f"--blocks must be a multiple of {NUM_STAGES}")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResMLP(args.blocks, args.dim, args.hidden)
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("fork")  # the children inherit the model: same weights everywhere
    queue = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        procs = [ctx.Process(target=worker, args=(r, port, args, model, workdir, queue)) for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"a benchmark rank failed with exit code {p.exitcode}")
    rounds, notes, names = result
    print(f"model: {args.blocks} residual MLP blocks {args.dim}->{args.hidden}->{args.dim}, batch {args.batch}, "
          f"{args.microbatches} micro-batches; 4 stages in a V on 2 Gloo ranks x 1 core; gradients of every "
          "contender checked against torch-zbv")
    for note in notes:
        print(f"note: {note}")
    print(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on "
          f"{os.cpu_count()} CPUs: above ~0.5 other processes share the ranks' cores and the ratios are noisy")
    print(f"{'contender':28s} {'median step ms':>15s} {'median ratio to torch-zbv':>27s}")
    for name in names:
        med = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["torch-zbv"] for r in rounds)
        print(f"{name:28s} {med * 1e3:15.2f} {ratio:27.3f}")
    pipec_name = names[1]
    ratio = statistics.median(r[pipec_name] / r["torch-zbv"] for r in rounds)
    print(f"median ratio {pipec_name} / torch-zbv over {len(rounds)} rounds: {ratio:.3f}  (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
