"""How close the optimal split comes to the lower bound, against the baselines.

Four models -- a GPT-style transformer whose LM head shares the (large)
embedding, a U-Net with long skips, a ResNet and a deep MLP of varying widths
-- traced once on one micro-batch and costed with the analytic H100 model
(``cost_models/h100-sxm.json``), then split into 2, 4 and 8 stages (1F1B,
``2 * num_stages`` micro-batches) by every strategy. Printed per row, all as
a ratio to the lower bound ``max(total / num_stages, largest node)``:

- ``compute``: the best contiguous split of compute time alone (no
  communication): what the graph's granularity allows at all;
- ``optimal``: pipec's split, communication and tied-gradient exchange included;
- ``equal-count``, ``by-params`` (DeepSpeed), ``greedy`` (fill to the average).

Goals: optimal <= 1.05 x lower bound where ``compute`` shows it attainable,
and never above any baseline.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/partition_quality.py
Takes about half a minute on a 2-core CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import pipec
from pipec.costs.analytic import load_cost_model
from pipec.partitioner.algorithm import STRATEGIES
from pipec.partitioner.graph import build_chain
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.search import monotone_minmax
from pipec.partitioner.single import partition_traced


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return out


class TiedGPT(nn.Module):
    """Embedding and LM head share one 32k x 512 matrix: a heavy last node."""

    def __init__(self, vocab: int = 32000, dim: int = 512, layers: int = 8, seq: int = 256) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.Sequential(*[Block(dim, 8) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.norm(self.blocks(self.embed(tokens) + self.pos)))
        return logits


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, ch: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.inc = conv(3, ch)
        self.down = nn.ModuleList(conv(ch * 2**i, ch * 2 ** (i + 1)) for i in range(depth))
        self.up = nn.ModuleList(conv(ch * 2 ** (i + 1) + ch * 2**i, ch * 2**i) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(ch, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for u in self.up:
            h = u(torch.cat([F.interpolate(h, scale_factor=2.0), skips.pop()], dim=1))
        out: torch.Tensor = self.outc(h)
        return out


class ResNet(nn.Module):
    def __init__(self, ch: int = 64, blocks: int = 12) -> None:
        super().__init__()
        self.stem = conv(3, ch)
        self.blocks = nn.ModuleList(nn.Sequential(conv(ch, ch), nn.Conv2d(ch, ch, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Linear(ch, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = torch.relu(h + b(h))
        out: torch.Tensor = self.head(h.mean(dim=(2, 3)))
        return out


def mlp() -> nn.Module:
    widths = [1024, 4096, 512, 2048, 8192, 1024, 256, 4096, 2048, 1024] * 2 + [1024]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "tied-gpt": (TiedGPT, lambda: (torch.randint(0, 32000, (4, 256)),)),
    "unet": (UNet, lambda: (torch.randn(4, 3, 128, 128),)),
    "resnet": (ResNet, lambda: (torch.randn(8, 3, 32, 32),)),
    "mlp": (mlp, lambda: (torch.randn(256, 1024),)),
}


def main() -> None:
    torch.manual_seed(0)
    cost_model = load_cost_model("h100-sxm")
    names = ("compute", *STRATEGIES)
    print(f"{'model':<9} {'nodes':>5} {'S':>2} {'lower bound':>12} " + " ".join(f"{n:>11}" for n in names)
          + f" {'solve s':>8}")
    worst = 0.0
    for label, (make, inputs) in MODELS.items():
        with torch.no_grad():
            traced = pipec.trace(make(), inputs(), check=False)
        costs = cost_model.node_costs(traced)
        for num_stages in (2, 4, 8):
            plans = {}
            for strategy in STRATEGIES:
                started = time.perf_counter()
                plans[strategy] = partition_traced(traced, costs, num_stages=num_stages,
                                                   num_microbatches=2 * num_stages, cost_model=cost_model,
                                                   strategy=strategy)
                if strategy == "optimal":
                    solve_time = time.perf_counter() - started
            bound = plans["optimal"].data.lower_bound
            problem = build_chain(traced, costs, num_stages=num_stages).problem
            compute, _ = monotone_minmax(problem, [tables_of(problem).prefix_time] * num_stages)
            ratios = [compute / bound] + [plans[s].data.bottleneck / bound for s in STRATEGIES]
            worst = max(worst, ratios[1] / ratios[0])
            assert all(ratios[1] <= r + 1e-12 for r in ratios[2:]), "a baseline beat the optimal split"
            print(f"{label:<9} {problem.num_nodes:>5} {num_stages:>2} {bound * 1e3:>9.3f} ms "
                  + " ".join(f"{r:>11.3f}" for r in ratios) + f" {solve_time:>8.3f}")
    print(f"optimal / best compute-only split, worst case: {worst:.3f} (communication's share)")


if __name__ == "__main__":
    main()
