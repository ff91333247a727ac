"""The models and cases of ``benchmarks/fidelity.py``: shapes, schedules, micro-batch counts.

Each model is built from code or from a ``transformers`` config (random weights,
nothing downloaded) with a fixed micro-batch size, so one profile per model
serves every case of it; the global batch is ``micro-batch size x M``. Sizes
are chosen so one step takes from a few milliseconds (tiny blocks, M = 2) to a
few hundred (the large blocks, GPT-2 with M = 8) on one CPU core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Model:
    """A model, one micro-batch's inputs made for ``M`` micro-batches, its loss."""

    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[tuple[Any, ...], dict[str, Any], Any]]  # M -> (args, kwargs, target)
    loss_fn: Callable[..., torch.Tensor]
    method: str = "auto"
    about: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    schedule: str
    num_microbatches: int
    stages_per_rank: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# -- models ------------------------------------------------------------------------


class Blocks(nn.Module):
    """Uniform residual MLP blocks and a small classifier head."""

    def __init__(self, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class HeavyHead(nn.Module):
    """Token embedding, a few blocks, and an LM head as costly as all blocks together."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


class Skips(nn.Module):
    """A stem read again at the end (a long skip across stages) and short skips between."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = h
        for i, block in enumerate(self.blocks):
            y = block(y) + (y if i % 2 else 0.5 * y)
        return self.head(y + h)


class TwoInput(nn.Module):
    """Two inputs of different widths, each with its own tower, merged late."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(32, width), nn.ReLU())
        self.merge = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.merge(self.a(a) * torch.sigmoid(self.b(b))))


def classes_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else output["logits"]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def seq_classes_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else output["logits"]
    return F.cross_entropy(logits, target)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return build


def _vectors(mb: int, width: int) -> Callable[[int], tuple[tuple[Any, ...], dict[str, Any], Any]]:
    def batch(m: int) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        return (torch.randn(mb * m, width, generator=_gen(1)),), {}, torch.randint(0, 10, (mb * m,), generator=_gen(2))

    return batch


def _tokens(mb: int, seq: int, vocab: int) -> Callable[[int], tuple[tuple[Any, ...], dict[str, Any], Any]]:
    def batch(m: int) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        t = torch.randint(0, vocab, (mb * m, seq + 1), generator=_gen(3))
        return (t[:, :-1],), {}, t[:, 1:].contiguous()

    return batch


def _two(mb: int) -> Callable[[int], tuple[tuple[Any, ...], dict[str, Any], Any]]:
    def batch(m: int) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        g = _gen(4)
        return ((torch.randn(mb * m, 128, generator=g), torch.randn(mb * m, 32, generator=g)), {},
                torch.randint(0, 10, (mb * m,), generator=g))

    return batch


def _bert_batch(mb: int, seq: int, vocab: int) -> Callable[[int], tuple[tuple[Any, ...], dict[str, Any], Any]]:
    def batch(m: int) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        g = _gen(5)
        tokens = torch.randint(0, vocab, (mb * m, seq), generator=g)
        return ((tokens,), {"attention_mask": torch.ones(mb * m, seq, dtype=torch.long)},
                torch.randint(0, 4, (mb * m,), generator=g))

    return batch


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=4096, n_positions=64, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=128, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=256,
        vocab_size=2048, max_position_embeddings=64, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


MODELS: dict[str, Model] = {
    "blocks-s": Model(_seeded(lambda: Blocks(64, 8)), _vectors(16, 64), classes_loss,
                      about="8 uniform residual MLP blocks, width 64, micro-batch 16"),
    "blocks-m": Model(_seeded(lambda: Blocks(256, 8)), _vectors(64, 256), classes_loss,
                      about="8 uniform residual MLP blocks, width 256, micro-batch 64"),
    "blocks-l": Model(_seeded(lambda: Blocks(512, 8)), _vectors(64, 512), classes_loss,
                      about="8 uniform residual MLP blocks, width 512, micro-batch 64"),
    "head": Model(_seeded(lambda: HeavyHead(8000, 128, 4)), _tokens(4, 32, 8000), lm_loss,
                  about="embedding, 4 tanh blocks, LM head over 8000 tokens (the heaviest node)"),
    "skips": Model(_seeded(lambda: Skips(256, 10)), _vectors(64, 64), classes_loss,
                   about="stem read again by the head (long skip), short skips between 10 blocks"),
    "two-input": Model(_seeded(lambda: TwoInput(384)), _two(64), classes_loss,
                       about="two inputs (128 and 32 wide), two towers merged"),
    "gpt2": Model(_seeded(_gpt2), _tokens(4, 64, 4096), lm_loss,
                  about="HF GPT-2 from config: 4 layers, 128 wide, vocab 4096, seq 64"),
    "llama": Model(_seeded(_llama), _tokens(4, 64, 2048), lm_loss,
                   about="HF Llama from config: 4 layers, 128 wide, GQA, vocab 2048, seq 64"),
    "bert": Model(_seeded(_bert), _bert_batch(4, 64, 2048), seq_classes_loss,
                  about="HF BERT from config (sequence classification), 4 layers, 128 wide, seq 64"),
}

CASES: tuple[Case, ...] = (
    Case("blocks-s/gpipe/2", "blocks-s", "gpipe", 2),
    Case("blocks-s/1f1b/8", "blocks-s", "1f1b", 8),
    Case("blocks-m/zb-h1/4", "blocks-m", "zb-h1", 4),
    Case("blocks-m/interleaved-zb/8", "blocks-m", "interleaved-zb", 8, stages_per_rank=2),
    Case("blocks-l/1f1b/4", "blocks-l", "1f1b", 4),
    Case("blocks-l/zb-v/8", "blocks-l", "zb-v", 8, stages_per_rank=2),
    Case("head/gpipe/4", "head", "gpipe", 4),
    Case("head/zb-h1/8", "head", "zb-h1", 8),
    Case("skips/1f1b/4", "skips", "1f1b", 4),
    Case("skips/interleaved-1f1b/4", "skips", "interleaved-1f1b", 4, stages_per_rank=2),
    Case("two-input/zb-h1/2", "two-input", "zb-h1", 2),
    Case("two-input/gpipe/8", "two-input", "gpipe", 8),
    Case("gpt2/1f1b/8", "gpt2", "1f1b", 8),
    Case("gpt2/interleaved-1f1b/4", "gpt2", "interleaved-1f1b", 4, stages_per_rank=2),
    Case("gpt2/zb-h1/4", "gpt2", "zb-h1", 4),
    Case("llama/gpipe/4", "llama", "gpipe", 4),
    Case("llama/zb-v/4", "llama", "zb-v", 4, stages_per_rank=2),
    Case("bert/1f1b/2", "bert", "1f1b", 2),
    Case("bert/zb-h2/8", "bert", "zb-h2", 8),
    Case("blocks-m/synth/4", "blocks-m", "synth", 4),
)

QUICK = ("blocks-s/1f1b/8", "head/zb-h1/8", "gpt2/1f1b/8", "skips/interleaved-1f1b/4")
