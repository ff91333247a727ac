"""A small zoo of models the tests share: each kind a pipeline partitioner meets.

Every model is deterministic in ``train()`` mode (no dropout, no batch-norm
statistics) so pipelined gradients can be compared with single-device ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """A deep MLP of varying widths."""

    def __init__(self, widths: tuple[int, ...] = (16, 64, 32, 64, 16, 8)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A ResNet-style CNN: stem, residual blocks, pooled linear head."""

    def __init__(self, channels: int = 8, num_blocks: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(num_blocks)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU())


class UNet(nn.Module):
    """A U-Net whose encoder outputs skip across the bottleneck to the decoder."""

    def __init__(self, channels: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.inc = _conv(1, channels)
        self.down = nn.ModuleList(_conv(channels * 2**i, channels * 2 ** (i + 1)) for i in range(depth))
        self.up = nn.ModuleList(
            _conv(channels * 2 ** (i + 1) + channels * 2**i, channels * 2**i) for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(nn.functional.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up in self.up:
            h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = up(torch.cat([h, skips.pop()], dim=1))
        return self.outc(h)


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the input embedding."""

    def __init__(self, vocab_size: int = 64, dim: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(self.norm(h))


class Chain(nn.Module):
    """Four linear layers with tanh in between: 6 -> 3 features, the V-placement tests' model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


class TwoInput(nn.Module):
    """Two inputs that meet half-way through."""

    def __init__(self, dim_a: int = 8, dim_b: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(dim_a, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.enc_b = nn.Sequential(nn.Linear(dim_b, hidden), nn.Tanh())
        self.mix = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.enc_a(a), self.enc_b(b)], dim=-1)
        return self.out(torch.relu(self.mix(h)))


def gpt2(num_layers: int = 2, dim: int = 32, vocab_size: int = 128, seq_len: int = 16) -> nn.Module:
    """HF GPT-2 built from a config: random weights, no download, no dropout."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=num_layers,
        n_embd=dim,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=seq_len,
        use_cache=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class DictInput(nn.Module):
    """A model whose one input is a dict of tensors (fx would bake it in; export takes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(torch.relu(self.a(batch["x"])) * torch.sigmoid(self.b(batch["y"])))


def dict_batch(seed: int) -> dict[str, torch.Tensor]:
    """A batch of 4 for :class:`DictInput`."""
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 8, generator=gen), "y": torch.randn(4, 4, generator=gen)}


class LongSkip(nn.Module):
    """``stem``'s output is read again by the last stage, whatever the split (a floating
    skip that needs its gradient back across non-adjacent stages)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(6)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.blocks(h) + h)


def example(name: str, batch: int = 4) -> tuple[nn.Module, tuple[Any, ...]]:
    """A seeded (model, example_inputs) pair by zoo name."""
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), (torch.randn(batch, 16),)
    if name == "resnet":
        return ResNet(), (torch.randn(batch, 3, 8, 8),)
    if name == "unet":
        return UNet(), (torch.randn(batch, 1, 16, 16),)
    if name == "tied":
        return TiedLM(), (torch.randint(0, 64, (batch, 6)),)
    if name == "two_input":
        return TwoInput(), (torch.randn(batch, 8), torch.randn(batch, 4))
    if name == "gpt2":
        return gpt2(), (torch.randint(0, 128, (batch, 16)),)
    raise KeyError(name)


ZOO = ("mlp", "resnet", "unet", "tied", "two_input", "gpt2")
