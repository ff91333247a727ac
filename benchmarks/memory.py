"""Activation recompute and memory: (a) a 13B decoder on 8 H100s, planned; (b) predicted vs measured here.

(a) A Llama-style 13B decoder (hidden 5120, 40 layers, 40 heads, MLP 13824,
vocabulary 32000; fp32, AdamW state), sequences of 4096 tokens, a batch of 16
in 16 micro-batches, 1F1B on 8 stages, costed by the analytic H100 model
(``cost_models/h100-sxm.json``) under an 80 GiB limit per rank. The model is
built on the meta device (``with torch.device("meta")``): pipec traces and
costs it from shapes alone, so no 52 GB of weights are allocated. Three plans:

- ``recompute="none"``: does not fit; the error names the smallest limit that would;
- ``recompute="full"``: every stage recomputes its forward;
- ``recompute="auto"``: the partitioner picks each stage's policy with the split.

Printed per plan: the simulated step time (``plan.simulate().step_time``), each
stage's policy and predicted memory per rank; then the speed-up of auto over
full everywhere (goal >= 1.1x).

(b) On this machine: small models (an MLP with dropout, a GPT-2 from a config)
on 2 Gloo ranks under 1F1B and ZB-H1, with and without recompute. Each rank
runs a step, an AdamW step, and a second, measured step
(``PipelineRuntime(..., track_memory=True)``, ``pipe.memory_stats()``); printed:
the plan's predicted memory per rank beside the measured peak, and their ratio
(goal within +-15%). The prediction is the one for the backend the run uses
(:meth:`pipec.plan.StageInfo.memory_on`, as ``pipe.memory_stats()`` reports it):
Gloo here, whose sends complete only once waited for, so the runtime holds every
tensor it sends until the step ends (``StageInfo.gloo_memory_bytes``); the NCCL
figure (``memory_bytes``, what the partitioner checks limits with) is shown beside it.

Run: ``PYTHONPATH=. python benchmarks/memory.py [--skip-a] [--skip-b]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipec  # noqa: E402
from pipec.units import format_bytes  # noqa: E402

GIB = 1 << 30


def llama_13b() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, use_cache=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def rank_memory(plan: pipec.Plan) -> list[int]:
    out = [0] * plan.data.num_ranks
    for st in plan.stages:
        out[st.rank] += st.memory_bytes
    return out


def show(name: str, plan: pipec.Plan) -> float:
    step = plan.simulate().step_time
    print(f"{name:>6}: simulated step {step:.3f} s; bottleneck {plan.data.bottleneck * 1e3:.1f} ms per micro-batch")
    for st, mem in zip(plan.stages, rank_memory(plan)):
        print(f"        stage {st.index} (rank {st.rank}): {st.recompute:<9} {len(st.nodes):4d} nodes  "
              f"{mem / GIB:6.1f} GiB  +{st.recompute_time * 1e3:6.2f} ms recompute")
    return step


def part_a() -> None:
    print("(a) Llama 13B (meta device), 8 stages, 1f1b, 16 micro-batches of 1 x 4096 tokens, h100-sxm, 80 GiB")
    started = time.perf_counter()
    model = llama_13b()
    print(f"    {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    x = torch.zeros(16, 4096, dtype=torch.long, device="meta")
    common: dict[str, Any] = dict(num_stages=8, num_microbatches=16, schedule="1f1b", cost_model="h100-sxm",
                                  memory_limit="80GiB")
    try:
        pipec.partition(model, (x,), recompute="none", **common)
        print("  none: fits (unexpected)")
    except pipec.PipecError as exc:
        found = re.search(r"smallest per-rank limit that fits is ([0-9.]+ \w+)", str(exc))
        print(f"  none: does not fit 80 GiB; smallest limit that fits: {found.group(1) if found else str(exc)}")
    full = show("full", pipec.partition(model, (x,), recompute="full", **common))
    auto_plan = pipec.partition(model, (x,), recompute="auto", **common)
    auto = show("auto", auto_plan)
    fits = all(m <= 80 * GIB for m in rank_memory(auto_plan))
    print(f"  auto fits 80 GiB: {fits}; speed-up auto / full everywhere: {full / auto:.2f}x (goal >= 1.1x)")
    print(f"  planned in {time.perf_counter() - started:.1f} s")


class DropMLP(nn.Module):
    def __init__(self, dim: int = 256, layers: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(torch.tanh(layer(x)))
        return self.head(x)


def _mlp_case() -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Any]:
    torch.manual_seed(0)
    return DropMLP(), (torch.randn(1024, 256),), torch.randn(1024, 8), F.mse_loss


def _gpt2_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _gpt2_case() -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Any]:
    from tests.models import gpt2

    torch.manual_seed(0)
    return gpt2(num_layers=4, dim=64, vocab_size=256, seq_len=64), (torch.randint(0, 256, (16, 64)),), \
        torch.randint(0, 256, (16, 64)), _gpt2_loss


def _measure(rank: int, world: int, plan: pipec.Plan, inputs: Any, target: Any, loss_fn: Any) -> Any:
    from pipec.runtime.runtime import PipelineRuntime

    pipe = PipelineRuntime(plan, loss_fn, track_memory=True, seed=1)
    opt = pipe.optimizer(torch.optim.AdamW, lr=1e-3)
    for _ in range(2):  # the second step runs with the optimizer state, as training does
        pipe.step(*inputs, target=target)
        opt.step()
        opt.zero_grad()
    pipe.step(*inputs, target=target)
    return pipe.memory_stats()


def part_b() -> None:
    from _workers import run_ranks

    print("\n(b) this machine: predicted vs measured peak memory per rank (2 Gloo ranks, AdamW state)")
    print(f"  {'model':<7} {'schedule':<8} {'recompute':<9} {'rank':>4} {'policy':<10} {'nccl':>10} "
          f"{'predicted':>10} {'measured':>10} {'ratio':>6}")
    ratios = []
    for name, case in (("mlp", _mlp_case), ("gpt2", _gpt2_case)):
        model, inputs, target, loss_fn = case()
        for schedule in ("1f1b", "zb-h1"):
            for recompute in ("none", "full", "selective"):
                plan = pipec.partition(model, inputs, num_stages=2, num_microbatches=4, schedule=schedule,
                                       cost_model="cpu", loss_fn=loss_fn, target=target, recompute=recompute)
                stats = run_ranks(_measure, 2, plan, inputs, target, loss_fn, timeout=300)
                for st in stats:
                    nccl = sum(s.memory_on("nccl") for s in plan.stages if s.rank == st.rank)
                    ratio = st.peak_bytes / st.predicted_bytes
                    ratios.append(ratio)
                    policy = "/".join(st.recompute.values())
                    print(f"  {name:<7} {schedule:<8} {recompute:<9} {st.rank:>4} {policy:<10} "
                          f"{format_bytes(nccl):>10} {format_bytes(st.predicted_bytes):>10} "
                          f"{format_bytes(st.peak_bytes):>10} {ratio:6.2f}")
    within = sum(abs(r - 1) <= 0.15 for r in ratios)
    print(f"  measured / predicted (gloo): {within} of {len(ratios)} within +-15%; "
          f"range {min(ratios):.2f} .. {max(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_a:
        part_a()
    if not args.skip_b:
        part_b()


if __name__ == "__main__":
    main()
