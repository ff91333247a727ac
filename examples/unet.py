"""A U-Net with long skip connections as a pipec factory.

Encoder outputs are read by the decoder several stages later; pipec sends them
straight from the producing stage to the consuming one, never through the
stages in between.

    pipec partition examples/unet.py:make --stages 4 -o out/unet
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU(),
    )


class UNet(nn.Module):
    def __init__(self, channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inc = conv_block(3, channels)
        self.down = nn.ModuleList(conv_block(channels * 2**i, channels * 2 ** (i + 1)) for i in range(depth))
        self.up = nn.ModuleList(
            conv_block(channels * 2 ** (i + 1) + channels * 2**i, channels * 2**i) for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = up(torch.cat([h, skips.pop()], dim=1))
        return self.outc(h)


def make() -> dict[str, Any]:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    return {
        "model": UNet(),
        "example_inputs": (images,),
        "loss_fn": F.cross_entropy,
        "target": torch.randint(0, 2, (8, 64, 64)),
    }


if __name__ == "__main__":
    import pipec

    made = make()
    plan = pipec.partition(made["model"], made["example_inputs"], num_stages=4, num_microbatches=4,
                           loss_fn=made["loss_fn"])
    print(plan.summary())
    for b in plan.boundaries:
        if b.consumer_stages != (b.producer_stage + 1,):
            print(f"skip {b.name}: stage {b.producer_stage} -> {b.consumer_stages}")
