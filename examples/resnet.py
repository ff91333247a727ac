"""A ResNet-style CNN (residual blocks, GroupNorm) as a pipec factory.

    pipec partition examples/resnet.py:make --stages 4 -o out/resnet
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, cout)
        self.shortcut: nn.Module = (
            nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), blocks_per_stage: int = 2,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.GroupNorm(4, widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(Block(cin, w, stride=2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))


def make() -> dict[str, Any]:
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    return {
        "model": ResNet(),
        "example_inputs": (images,),
        "loss_fn": F.cross_entropy,
        "target": torch.randint(0, 100, (16,)),
    }


if __name__ == "__main__":
    import pipec

    made = make()
    plan = pipec.partition(made["model"], made["example_inputs"], num_stages=4, num_microbatches=8,
                           loss_fn=made["loss_fn"])
    print(plan.summary())
