"""The residual MLP the runtime benchmarks against torch.distributed.pipelining run
(runtime_vs_torch.py, schedules_vs_torch.py): blocks of Linear-GELU-Linear with a skip."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class ResMLP(nn.Module):
    def __init__(self, num_blocks: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, hidden) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()
