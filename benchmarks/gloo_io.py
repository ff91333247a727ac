"""Gloo's event-loop thread under SCHED_BATCH or not: the runtime's step, A/B in one run.

``PipelineRuntime`` puts Gloo's ``gloo_tcp_loop`` thread under ``SCHED_BATCH``
(:mod:`pipec.runtime.gloo_io`: woken while the rank's thread holds the
connection's lock, it spun until the next scheduler tick, stalling sends and
receives by 1-5 ms). This bench runs a few of the fidelity sweep's cases
(``_fidelity_cases``) on 2 Gloo ranks, each pinned to one core with one thread,
and alternates rounds with the thread put back under ``SCHED_OTHER`` (the
default before), under ``SCHED_BATCH`` alone, and under ``SCHED_BATCH`` with
the runtime yielding the core after each send (what the runtime does), the
order swapped every round, so a slow spell of the machine falls on all alike.
Printed per case: the median step of each (the slowest rank's, between
barriers) and the ratios to ``SCHED_OTHER``. Linux only.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gloo_io.py [--rounds 8] [--steps 3]
        [--cases blocks-s/1f1b/8,skips/interleaved-1f1b/4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _fidelity_cases import CASES, MODELS  # noqa: E402
from _two_ranks import run_two, timed_step  # noqa: E402

DEFAULT_CASES = ("blocks-s/1f1b/8", "skips/interleaved-1f1b/4", "two-input/gpipe/8", "gpt2/1f1b/8",
                 "blocks-m/zb-h1/4")


def set_loop_policy(policy: int) -> None:
    from pipec.runtime.gloo_io import loop_threads

    for tid in loop_threads():
        os.sched_setscheduler(tid, policy, os.sched_param(0))


def worker(rank: int, port: int, names: list[str], rounds: int, steps: int, out: Any) -> None:
    import pipec
    from pipec.runtime.runtime import PipelineRuntime

    os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cases = [c for c in CASES if c.name in names]
    runners, batches = {}, {}
    for case in cases:
        model = MODELS[case.model]
        args, kwargs, target = model.batch(case.num_microbatches)
        plan = pipec.partition(model.build(), args, example_kwargs=kwargs, num_stages=2 * case.stages_per_rank,
                               num_microbatches=case.num_microbatches, schedule=case.schedule,
                               stages_per_rank=case.stages_per_rank, loss_fn=model.loss_fn, target=target,
                               method=model.method, cost_model="cpu")
        runners[case.name] = PipelineRuntime(plan, loss_fn=model.loss_fn)
        batches[case.name] = (args, kwargs, target)
    times: dict[tuple[str, str], list[float]] = {}
    from pipec.runtime import gloo_io

    policies = {"SCHED_OTHER": (os.SCHED_OTHER, False), "SCHED_BATCH": (os.SCHED_BATCH, False),
                "BATCH+yield": (os.SCHED_BATCH, True)}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(policies) if r % 2 else list(policies)[::-1]
        for name in order:
            set_loop_policy(policies[name][0])
            gloo_io.YIELD_AFTER_SEND = policies[name][1]
            for case in cases:
                for _ in range(steps):
                    took = timed_step(runners[case.name], batches[case.name]).slowest
                    if r:
                        times.setdefault((case.name, name), []).append(took)
    if rank == 0:
        out.put(times)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("SCHED_BATCH and /proc/self/task: Linux only")
    names = args.cases.split(",")
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(c.name for c in CASES)}")
    times = run_two(worker, names, args.rounds, args.steps)
    load = os.getloadavg()
    print(f"2 Gloo ranks x 1 core x 1 thread; {args.rounds} rounds x {args.steps} steps per policy, alternated; "
          f"load average after {load[0]:.2f}")
    print(f"{'case':28s} {'SCHED_OTHER':>12s} {'SCHED_BATCH':>12s} {'BATCH+yield':>12s} {'ratio':>6s} {'ratio':>6s}"
          "   (median step, ms; ratios to SCHED_OTHER)")
    ratios: list[tuple[float, float]] = []
    for name in names:
        a, b, c = (statistics.median(times[(name, k)]) for k in ("SCHED_OTHER", "SCHED_BATCH", "BATCH+yield"))
        ratios.append((b / a, c / a))
        print(f"{name:28s} {a * 1e3:12.2f} {b * 1e3:12.2f} {c * 1e3:12.2f} {b / a:6.2f} {c / a:6.2f}")
    print(f"median ratio to SCHED_OTHER: SCHED_BATCH {statistics.median(r[0] for r in ratios):.2f}, "
          f"BATCH+yield {statistics.median(r[1] for r in ratios):.2f}")


if __name__ == "__main__":
    main()
