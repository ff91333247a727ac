"""How long planning takes on a CPU box, phase by phase.

The README's headline use case: plan an 8xH100 pipeline of a large config
from a laptop with the ``h100-sxm`` analytic cost model. Default model: a
GPT-2-medium-sized ``GPT2LMHeadModel`` (24 layers, width 1024, 16 heads,
1024 positions), batch 64 x 1024 tokens, 8 stages, 32 micro-batches, 1F1B.
``--small``: a 4-layer, width-256, 256-token GPT-2 (seconds, for a quick check).

Phases, as :func:`pipec.partition` runs them: trace (eager reference,
torch.export, output check, tensor metas), cost (the cost model's
``node_costs``), chain (the chain problem and its liveness tables), solve
(the optimal split), assemble (plan data) and simulate (the schedule).

Goal: the GPT-2-medium plan in under 20 s on a 2-core laptop.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/plan_speed.py [--small] [--cost-model h100-sxm]
      [--json plan.json]  (writes the plan data, to compare plans across versions)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from pipec.facade import Plan
from pipec.partitioner.algorithm import solve
from pipec.partitioner.assemble import build_plan_data
from pipec.partitioner.inputs import first_microbatch
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.single import chain_for, make_schedule_checked, resolve_cost_model
from pipec.tracing import trace


def model_and_tokens(small: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    layers, dim, heads, seq = (4, 256, 4, 256) if small else (24, 1024, 16, 1024)
    config = transformers.GPT2Config(n_layer=layers, n_embd=dim, n_head=heads, n_positions=seq, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (64, seq))
    return model, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 4-layer GPT-2 instead of GPT-2 medium")
    parser.add_argument("--cost-model", default="h100-sxm", help="a name in cost_models/ or 'profile'")
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the plan data here")
    args = parser.parse_args()

    built = time.perf_counter()
    model, tokens = model_and_tokens(args.small)
    times = {"build model": time.perf_counter() - built}

    def timed(phase: str, started: float) -> float:
        now = time.perf_counter()
        times[phase] = now - started
        return now

    started = time.perf_counter()
    sched = make_schedule_checked("1f1b", args.stages, args.microbatches, 1)
    mb_args, mb_kwargs = first_microbatch((tokens,), {}, args.microbatches)
    traced = trace(model, mb_args, mb_kwargs)
    now = timed("trace", started)
    cost_model = resolve_cost_model(args.cost_model, traced)
    node_costs = cost_model.node_costs(traced)
    now = timed("cost", now)
    chain = chain_for(traced, node_costs, sched, cost_model=cost_model, memory_limit=None,
                      device_speeds=None, optimizer_state_bytes_per_param=8)
    tables_of(chain.problem)  # builds the liveness tables
    now = timed("chain", now)
    solution = solve(chain.problem, "optimal")
    now = timed("solve", now)
    data = build_plan_data(chain, traced, node_costs, solution, schedule=sched, strategy="optimal",
                           cost_model_name=cost_model.name, batch_size=int(tokens.shape[0]))
    plan = Plan(data, traced=traced)
    now = timed("assemble", now)
    simulation = plan.simulate()
    timed("simulate", now)
    total = time.perf_counter() - started

    print(f"{'small' if args.small else 'GPT-2 medium'}: {len(traced.nodes)} nodes ({traced.method}), "
          f"{args.stages} stages, {args.microbatches} micro-batches, cost model {cost_model.name}")
    for phase, seconds in times.items():
        print(f"  {phase:<12} {seconds:8.2f} s")
    print(f"  {'total':<12} {total:8.2f} s   (pipec.partition's share: everything but 'build model')")
    print(f"  bottleneck {solution.bottleneck * 1e3:.3f} ms, cuts {solution.cuts}, "
          f"simulated step {simulation.step_time * 1e3:.1f} ms")
    if args.json is not None:
        args.json.write_text(plan.data.model_dump_json(indent=1))


if __name__ == "__main__":
    main()
