"""pipec's stage runtime against torch.distributed.pipelining, same model, split and schedule.

The model is a stack of identical residual MLP blocks (``x + fc2(gelu(fc1(x)))``),
cut in the middle into 2 stages on 2 Gloo ranks, each rank pinned to one core
(``os.sched_setaffinity``) with one thread. Both runtimes run 1F1B with the
same micro-batches on the same weights:

- pipec: ``pipec.partitioner.assemble.plan_from_split`` at the middle block, then
  :class:`pipec.PipelineRuntime`;
- torch: the manual frontend, ``PipelineStage`` (static shapes) +
  ``Schedule1F1B``.

Steps alternate in pairs (pipec, torch), then (torch, pipec), ... so machine
noise hits both; a step's time is the slowest rank's, between barriers. The
script prints the median of the per-pair ratios pipec / torch (goal <= 1.0).

Memory, in a separate launch per runtime so the two do not share a peak: each
rank measures ``params + grads`` exactly (tensor bytes) and the activation
peak as the rise of its resident set size (``/proc/self/statm``, sampled
every 0.2 ms by a thread) above its level before the step, with glibc told
to serve every allocation of 4 KiB or more by ``mmap`` (``mallopt``) so freed
tensors leave the resident set at once (page granularity; the receive
buffers pipec preallocates are counted before the step, torch's are not). The plan predicts
``plan.stages[i].memory_bytes`` (parameters, gradients, optimizer state at
``optimizer_state_bytes_per_param`` -- 0 here, the benchmark has no
optimizer -- and the activations the schedule keeps in flight) and the
simulator's per-rank peak.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/runtime_vs_torch.py [--pairs 20] [--blocks 8]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import ResMLP, mse
from torch import nn

# -- the two runtimes -------------------------------------------------------------


def build_plan(model: ResMLP, x: torch.Tensor, args: argparse.Namespace) -> Any:
    """pipec's plan: 2 stages, the second starting at block ``blocks // 2``, 1F1B,
    costed by the analytic model of ``cost_models/cpu.json``."""
    import pipec
    from pipec.partitioner.assemble import plan_from_split

    traced = pipec.trace(model, (x,))
    cost_model = pipec.load_cost_model("cpu")
    first = next(n.name for n in traced.nodes if n.module_path.startswith(f"blocks.{args.blocks // 2}"))
    data = plan_from_split(
        traced,
        cost_model.node_costs(traced),
        [first],
        schedule="1f1b",
        num_microbatches=args.microbatches,
        cost_model=cost_model,
        optimizer_state_bytes_per_param=0,  # the benchmark runs no optimizer
        batch_size=args.batch,
    )
    return pipec.Plan(data, traced=traced, loss_fn=mse)


def torch_schedule(model: ResMLP, rank: int, args: argparse.Namespace) -> Any:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    half = args.blocks // 2
    blocks = list(model.blocks)
    part = nn.Sequential(*(blocks[:half] if rank == 0 else blocks[half:]))
    mb = torch.empty(args.batch // args.microbatches, args.dim)
    # static shapes (no metadata exchange); a boundary that carries a gradient is marked so
    inp = mb.clone().requires_grad_(rank > 0)
    stage = PipelineStage(part, rank, 2, torch.device("cpu"), input_args=(inp,),
                          output_args=(mb.clone().requires_grad_(True),))
    return Schedule1F1B(stage, n_microbatches=args.microbatches, loss_fn=mse)


class Runner:
    """One runtime's step on this rank; ``step()`` runs the full batch."""

    def __init__(self, name: str, rank: int, model: ResMLP, plan: Any, args: argparse.Namespace) -> None:
        self.name, self.rank = name, rank
        torch.manual_seed(1)
        self.x = torch.randn(args.batch, args.dim)
        self.y = torch.randn(args.batch, args.dim)
        model = copy.deepcopy(model)
        if name == "pipec":
            from pipec.runtime.runtime import PipelineRuntime

            self.pipe = PipelineRuntime(plan, loss_fn=mse)
            self.params = list(self.pipe.parameters())
            self.named = dict(self.pipe.named_parameters())
        else:
            self.sched = torch_schedule(model, rank, args)
            offset = 0 if rank == 0 else args.blocks // 2
            self.named = {
                f"blocks.{offset + int(n.split('.')[0])}.{n.split('.', 1)[1]}": p
                for n, p in self.sched._stage.submod.named_parameters()
            }
        self.params = list(self.named.values())

    def step(self) -> None:
        if self.name == "pipec":
            self.pipe.step(self.x, target=self.y)
        elif self.rank == 0:
            self.sched.step(self.x)
        else:
            self.sched.step(target=self.y, losses=[])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# -- measuring ----------------------------------------------------------------------


def timed_step(runner: Runner) -> float:
    runner.zero_grad()
    dist.barrier()
    t0 = time.perf_counter()
    runner.step()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the resident set size in a thread started once (a new thread's
    stack and malloc arena would otherwise count); ``window()`` measures the
    highest value seen while it is open."""

    def __init__(self, interval: float = 2e-4) -> None:
        self.interval, self.peak, self._open = interval, 0, False
        threading.Thread(target=self._run, daemon=True).start()
        time.sleep(0.05)

    def _run(self) -> None:
        while True:
            if self._open:
                self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self.peak = _rss_bytes()
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        self.peak = max(self.peak, _rss_bytes())


def _mmap_tensor_allocations() -> None:
    """Serve every allocation of a page or more by mmap, so a freed tensor
    leaves the resident set at once and the RSS follows the live bytes."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 4096)
    libc.mallopt(m_trim_threshold, 4096)


def _setup(rank: int, port: int) -> None:
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # type: ignore[operator]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _plan(model: ResMLP, args: argparse.Namespace) -> Any:
    # plans are made per micro-batch: trace one micro-batch
    return build_plan(model, torch.randn(args.batch // args.microbatches, args.dim), args)


def time_worker(rank: int, port: int, args: argparse.Namespace, model: ResMLP, out: Any) -> None:
    _setup(rank, port)
    plan = _plan(model, args)
    runners = {n: Runner(n, rank, model, plan, args) for n in ("pipec", "torch")}
    for _ in range(args.warmup):
        for r in runners.values():
            timed_step(r)
    # both computed the same gradients (a guard against timing a broken run)
    mine, theirs = runners["pipec"].named, runners["torch"].named
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    for n in mine:
        torch.testing.assert_close(mine[n].grad, theirs[n].grad, rtol=1e-4, atol=1e-6)
    pairs = []
    for i in range(args.pairs):
        order = ("pipec", "torch") if i % 2 == 0 else ("torch", "pipec")
        t = {n: timed_step(runners[n]) for n in order}
        pairs.append((t["pipec"], t["torch"]))
    if rank == 0:
        out.put(pairs)
    dist.destroy_process_group()


def memory_worker(rank: int, port: int, args: argparse.Namespace, model: ResMLP, name: str, out: Any) -> None:
    _mmap_tensor_allocations()
    _setup(rank, port)
    plan = _plan(model, args)
    runner = Runner(name, rank, model, plan, args)
    timed_step(runner)  # grads exist from here on, as in training
    rss = RssPeak()
    peaks = []
    for _ in range(3):
        for p in runner.params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.barrier()
        before = _rss_bytes()
        with rss:
            runner.step()
        dist.barrier()
        peaks.append(rss.peak - before)
    weights = sum(p.numel() * p.element_size() for p in runner.params)
    out.put((rank, name, 2 * weights, min(peaks)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(fn: Any, *extra: Any) -> list[Any]:
    ctx = mp.get_context("fork")  # the children inherit the model: same weights everywhere
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, port, *extra, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a benchmark rank failed with exit code {p.exitcode}")
    while not queue.empty():
        results.append(queue.get())
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResMLP(args.blocks, args.dim, args.hidden)
    # Each rank builds the (deterministic) plan itself: this process runs no
    # autograd before forking, which CUDA builds of torch do not allow.
    (pairs,) = _launch(time_worker, args, model)
    ratios = [p / t for p, t in pairs]
    med_p = statistics.median(p for p, _ in pairs)
    med_t = statistics.median(t for _, t in pairs)
    print(f"model: {args.blocks} residual MLP blocks {args.dim}->{args.hidden}->{args.dim}, batch {args.batch}, "
          f"{args.microbatches} micro-batches, 1f1b, 2 Gloo ranks x 1 core")
    print(f"step time  pipec {med_p * 1e3:8.2f} ms   torch.distributed.pipelining {med_t * 1e3:8.2f} ms  (medians of {len(pairs)})")
    print(f"median ratio pipec / torch over {len(pairs)} alternating pairs: {statistics.median(ratios):.3f}  (goal <= 1.0)")

    memory = {name: sorted(_launch(memory_worker, args, model, name)) for name in ("pipec", "torch")}
    plan = _plan(model, args)
    sim = plan.simulate()
    for name in ("pipec", "torch"):
        for rank, _, weights, act in memory[name]:
            stage = plan.stages[rank]
            print(f"memory {name:5s} rank {rank}: params+grads {weights / 2**20:7.2f} MiB, activation peak "
                  f"{act / 2**20:7.2f} MiB, total {(weights + act) / 2**20:7.2f} MiB | plan: stage "
                  f"{stage.memory_bytes / 2**20:7.2f} MiB, simulated peak {sim.peak_memory[rank] / 2**20:7.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
