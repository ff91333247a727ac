"""Hybrid data x pipeline parallelism: (a) measured here, (b) planned for a cluster.

(a) ``--part a``: on this machine, DP2xPP1 vs DP1xPP2 vs one process,
    measured against simulated (``benchmarks/_hybrid_measured.py``; its own
    options follow ``--part a``).

(b) ``planned()``: from a laptop, a Llama-style 7B config (hidden 4096, 32
    layers, 32 heads, intermediate 11008, 4,096-token sequences; built on the
    meta device, so nothing is allocated) planned with the analytic ``h100-sxm``
    cost model on 8, 64 and 512 devices (8 per node), bf16 weights and Adam with
    fp32 master weights (12 optimizer bytes per parameter), a global batch of
    64, 256 and 1,024 sequences (256k, 1M and 4M tokens; a 7B model does not
    fit 8 devices at more than one sequence per micro-batch without activation
    recompute). It prints the chosen (D, P, v, M, schedule, mesh
    order), the predicted step time and MFU, the search time -- and the best
    configuration an exhaustive search finds over the same space (every
    configuration split on its own, under its own links, memory and micro-batch
    size; skipped only where a provable bound says it cannot win, or with
    ``--full`` not even then), which the chosen one must match or come within 2% of.

MFU = model FLOPs per step / (devices x step time x dense bf16 peak), model
FLOPs = 6 x parameters x tokens + 12 x layers x hidden x sequence x tokens
(PaLM, Chowdhery et al. 2022, appendix B).

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hybrid.py [--part a [--steps N ...] | --part b] [--devices 8 64 512]
      [--batch 64 256 1024] [--no-exhaustive]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import transformers
from _table import aligned

LAYERS, HIDDEN, HEADS, FFN, SEQ, VOCAB = 32, 4096, 32, 11008, 4096, 32000


def llama_7b() -> torch.nn.Module:
    """The 7B config on the meta device: shapes and dtypes only."""
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=SEQ, vocab_size=VOCAB, use_cache=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def measured(argv: list[str]) -> None:
    """Part (a): measured on this machine (benchmarks/_hybrid_measured.py)."""
    import _hybrid_measured

    _hybrid_measured.main(argv)


def model_flops(num_params: int, tokens: int) -> float:
    return 6.0 * num_params * tokens + 12.0 * LAYERS * HIDDEN * SEQ * tokens


def planned(devices: list[int], batches: list[int], exhaustive: bool, full: bool = False) -> None:
    """Part (b): plan the 7B config on each device count (see the module docstring)."""
    import pipec
    from pipec.partitioner.hybrid import finish, prepare_search
    from pipec.partitioner.hybrid_search import HybridConfig, search

    model = llama_7b()
    num_params = sum(p.numel() for p in model.parameters())
    peak = pipec.load_cost_model("h100-sxm").spec.peak_flops["bf16"]
    rows = [["devices", "batch", "D", "P", "v", "M", "schedule", "mesh", "step s", "MFU", "search s", "configs",
             "simulated", "exhaustive best s", "gap", "exhaustive s"]]
    for n, batch in zip(devices, batches):
        tokens = torch.zeros((batch, SEQ), dtype=torch.long, device="meta")
        started = time.perf_counter()
        prepared = prepare_search(
            model, tokens, num_devices=n, devices_per_node=None, num_stages=None, num_microbatches=None,
            schedule="auto", stages_per_rank="auto", loss_fn=None, cost_model="h100-sxm", memory_limit=None,
            example_kwargs=None, method="auto", optimizer_state_bytes_per_param=12, leaf_modules=())
        traced = time.perf_counter() - started
        result = search(prepared.inputs, prepared.configs, global_batch=batch)
        plan = pipec.Plan(finish(prepared, result).data)
        search_time = time.perf_counter() - started
        d = plan.data
        step = plan.simulate().step_time
        mfu = model_flops(num_params, batch * SEQ) / (n * step * peak)
        best = result.best
        gap = full_time = float("nan")
        full_best = None
        if exhaustive and best is not None:
            full_started = time.perf_counter()
            full = search(prepared.inputs, prepared.configs, global_batch=batch, exhaustive=True, prune=not full)
            full_time = time.perf_counter() - full_started
            full_best = full.best
            # the chosen configuration as the exhaustive search priced it (its own split), against the best
            picked = HybridConfig(d.data_parallel, d.num_ranks, d.schedule.name, d.stages_per_rank,
                                  d.num_microbatches, (d.mesh_order[0], d.mesh_order[1]))
            mine = [e for e in full.ranked if e.config == picked and e.simulated]
            if full_best is not None:
                chosen = mine[0].step_time if mine else best.step_time
                gap = chosen / full_best.step_time - 1.0
        rows.append([
            str(n), str(batch), str(d.data_parallel), str(d.num_ranks), str(d.stages_per_rank), str(d.num_microbatches),
            d.schedule.name, "x".join(d.mesh_order), f"{step:.3f}", f"{mfu:.1%}",
            f"{search_time:.1f} (trace {traced:.1f})", str(result.num_configs), str(result.num_simulated),
            "-" if full_best is None else f"{full_best.step_time:.3f} ({full_best.config.label})",
            "-" if full_best is None else f"{gap:+.2%}", f"{full_time:.1f}",
        ])
        print(aligned(rows[:1] + rows[-1:]), flush=True)
        if full_best is not None and gap > 0.02:
            print(f"WARNING: {n} devices: the search's best is {gap:.2%} slower than the exhaustive best")
    print()
    print(aligned(rows))
    print("\nstep s: the chosen plan's simulated step (traced at its own micro-batch size); exhaustive best s: "
          "the fastest of every configuration simulated with its own split; gap: the chosen configuration, "
          "priced the same way, against it. search s: tracing included.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b"), default="b")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024],
                        help="global batch per device count, in sequences of 4,096 tokens")
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive comparison")
    parser.add_argument("--full", action="store_true", help="exhaustive without bounds: simulate everything")
    parser.add_argument("-v", "--verbose", action="store_true")
    args, rest = parser.parse_known_args()
    if args.part == "b" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    # the exhaustive reference splits interleaved stages under the memory limit thousands of times; each
    # such split warns that it may not be optimal
    logging.getLogger("pipec.partitioner.algorithm").setLevel(logging.ERROR)
    if args.part == "a":
        measured(rest)
    else:
        if len(args.batch) != len(args.devices):
            parser.error("--batch needs one global batch per --devices value")
        planned(args.devices, args.batch, not args.no_exhaustive, args.full)


if __name__ == "__main__":
    main()
