"""How well per-node profiles add up to the whole model.

For three models -- an MLP, a small ResNet-style CNN and a small GPT-2 built
from ``transformers.GPT2Config`` (random weights, no download, traced with
``method="export"``) -- this profiles every node (``pipec.profile``) and
compares the sum of per-node forward + backward (I + W) times with the
whole model's measured forward + backward time (median over repeats). The
goal is a ratio within 1 +- 0.2. For reference it also prints the analytic
roofline estimate (the ``cost_models/`` file of this device: ``cpu``, or the
GPU's) against the same measurement.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_accuracy.py [--device cuda --scale 8]
Takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import pipec
from pipec.costs.analytic import AnalyticCostModel
from pipec.costs.profiled import default_spec


class MLP(nn.Module):
    def __init__(self, width: int = 512, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self, channels: int = 32, num_blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(num_blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=256, n_head=4, vocab_size=2048, n_positions=128, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def cases(scale: int = 1) -> list[tuple[str, nn.Module, tuple[Any, ...], str]]:
    """(name, model, inputs, trace method); ``scale`` multiplies the batch sizes."""
    torch.manual_seed(0)
    return [
        ("mlp", MLP(), (torch.randn(128 * scale, 512),), "auto"),
        ("resnet", ResNet(), (torch.randn(8 * scale, 3, 32, 32),), "auto"),
        ("gpt2", gpt2(), (torch.randint(0, 2048, (4 * scale, 128)),), "export"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="multiply the batch sizes (e.g. 8 on a GPU)")
    opts = parser.parse_args()
    print(f"device={opts.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"repeats={opts.repeats} scale={opts.scale}")
    print(f"{'model':8} {'nodes':>5} {'whole fwd+bwd':>13} {'sum of nodes':>12} {'ratio':>6} "
          f"{'fwd ratio':>9} {'analytic':>9} {'time':>6}")
    for name, model, inputs, method in cases(opts.scale):
        start = time.perf_counter()
        traced = pipec.trace(model, inputs, method=method)
        prof = pipec.profile(traced, device=opts.device, repeats=opts.repeats, progress=False)
        elapsed = time.perf_counter() - start
        whole = prof.forward_backward_time
        nodes = prof.node_time
        forward = sum(c.forward_time for c in prof.nodes.values())
        analytic = AnalyticCostModel(default_spec(prof))  # cost_models/ file of this device
        estimate = sum(c.total_time for c in analytic.node_costs(traced).values())
        print(f"{name:8} {len(prof.nodes):5d} {whole * 1e3:10.2f} ms {nodes * 1e3:9.2f} ms "
              f"{nodes / whole:6.2f} {forward / prof.forward_time:9.2f} {estimate / whole:9.2f} {elapsed:5.1f}s")


if __name__ == "__main__":
    main()
