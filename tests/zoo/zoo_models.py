"""The model zoo: real architectures built from configs (random weights, nothing downloaded).

Each entry is a function returning a :class:`ZooCase`: a seeded model factory,
one full batch (positional inputs, keyword inputs, target) and the loss, sized
so the whole zoo runs in a couple of minutes on two CPU cores: 2 layers,
hidden 32-64, 32x32 images, batch 4 split into 2 micro-batches.

Models are built the way a user would build them: default configs apart from
the size, and ``use_cache=False`` on decoders where the README does the same.
Dropout probabilities are 0 unless the case is about dropout, so pipelined
gradients can be compared with single-process ones; the dropout case brings a
dropout-free twin with the same weights for its gradient check.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F

BATCH = 4
NUM_MICROBATCHES = 2
SEQ = 8
VOCAB = 96
IMAGE = 32
NUM_CLASSES = 5


@dataclass(frozen=True)
class ZooCase:
    """One zoo model and its batch.

    ``build()`` returns a fresh model with the same weights each call.
    ``microbatch_reference``: the model normalises over the batch (BatchNorm), so
    its reference gradients accumulate ``loss / num_microbatches`` over the
    micro-batches, as the pipeline computes them, instead of one full-batch loss.
    ``grad_build``: a twin of ``build`` without dropout (same weights) whose
    pipelined gradients are checked in place of the stochastic model's.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[Any, ...]
    loss_fn: Callable[..., torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    microbatch_reference: bool = False
    grad_build: Callable[[], nn.Module] | None = None
    about: str = ""


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return build


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _images(seed: int = 2) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _classes(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (BATCH,), generator=torch.Generator().manual_seed(seed))


# -- losses (module level: a saved plan is given its loss again at load) -------
def hf_loss(output: Any) -> torch.Tensor:
    """The loss the HF model computed from its ``labels``."""
    return output["loss"]


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output["logits"] if not isinstance(output, torch.Tensor) else output
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def logits_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output["logits"] if not isinstance(output, torch.Tensor) else output
    return F.cross_entropy(logits, target)


# -- language models -----------------------------------------------------------
def gpt2() -> ZooCase:
    """GPT-2 computing its own loss from ``labels``, with a padding ``attention_mask``,
    both passed as keyword inputs."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    tokens = _tokens(BATCH, SEQ)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[:, -2:] = 0  # the same padding in every sample: each micro-batch has as many tokens
    return ZooCase(
        "gpt2", _seeded(lambda: transformers.GPT2LMHeadModel(config)), (tokens,), hf_loss,
        kwargs={"attention_mask": mask, "labels": tokens.clone()},
        about="HF GPT-2, labels + attention_mask as example_kwargs",
    )


def bert() -> ZooCase:
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=NUM_CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    return ZooCase(
        "bert", _seeded(lambda: transformers.BertForSequenceClassification(config)),
        (_tokens(BATCH, SEQ, seed=4),), logits_loss, kwargs={"attention_mask": mask},
        target=_classes(), about="HF BERT sequence classification",
    )


def t5() -> ZooCase:
    config = transformers.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, d_ff=64, num_heads=2,
        vocab_size=VOCAB, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0,
    )
    decoder = _tokens(BATCH, SEQ - 2, seed=6)
    return ZooCase(
        "t5", _seeded(lambda: transformers.T5ForConditionalGeneration(config)),
        (_tokens(BATCH, SEQ, seed=5),), lm_loss, kwargs={"decoder_input_ids": decoder},
        target=_tokens(BATCH, SEQ - 2, seed=7), about="HF T5 encoder-decoder, decoder_input_ids",
    )


def _decoder(name: str, config_cls: Any, model_cls: Any, **extra: Any) -> ZooCase:
    config = config_cls(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2 * SEQ, **extra,
    )
    tokens = _tokens(BATCH, SEQ + 1, seed=8)
    return ZooCase(
        name, _seeded(lambda: model_cls(config)), (tokens[:, :-1],), lm_loss, target=tokens[:, 1:],
        about=f"HF {model_cls.__name__} (GQA decoder)",
    )


def llama() -> ZooCase:
    return _decoder("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, use_cache=False)


def qwen2() -> ZooCase:
    return _decoder("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, use_cache=False)


def mistral() -> ZooCase:
    """Mistral with its default ``use_cache`` (True): the output carries a KV cache."""
    case = _decoder("mistral", transformers.MistralConfig, transformers.MistralForCausalLM,
                    sliding_window=SEQ)
    return ZooCase(**{**case.__dict__, "about": case.about + ", default use_cache=True"})


# -- vision ----------------------------------------------------------------------
def resnet() -> ZooCase:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=NUM_CLASSES,
    )
    return ZooCase(
        "resnet", _seeded(lambda: transformers.ResNetForImageClassification(config)), (_images(),),
        logits_loss, target=_classes(), microbatch_reference=True, about="HF ResNet (BatchNorm)",
    )


def mobilenet_v2() -> ZooCase:
    config = transformers.MobileNetV2Config(
        image_size=IMAGE, depth_multiplier=0.25, finegrained_output=False, num_labels=NUM_CLASSES,
        classifier_dropout_prob=0.0,
    )
    return ZooCase(
        "mobilenet_v2", _seeded(lambda: transformers.MobileNetV2ForImageClassification(config)),
        (_images(seed=9),), logits_loss, target=_classes(seed=10), microbatch_reference=True,
        about="HF MobileNetV2 (BatchNorm, depthwise convs, ReLU6)",
    )


def vit() -> ZooCase:
    config = transformers.ViTConfig(
        image_size=IMAGE, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=NUM_CLASSES, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ZooCase(
        "vit", _seeded(lambda: transformers.ViTForImageClassification(config)), (_images(seed=11),),
        logits_loss, target=_classes(seed=12), about="HF ViT",
    )


def efficientnet() -> ZooCase:
    config = transformers.EfficientNetConfig(
        image_size=IMAGE, width_coefficient=0.25, depth_coefficient=1.0, hidden_dim=320,
        in_channels=[32, 64], out_channels=[64, 96], kernel_sizes=[3, 3], strides=[1, 2],
        num_block_repeats=[1, 1], expand_ratios=[1, 2], num_labels=NUM_CLASSES,
        dropout_rate=0.0, drop_connect_rate=0.0,
    )
    return ZooCase(
        "efficientnet", _seeded(lambda: transformers.EfficientNetForImageClassification(config)),
        (_images(seed=13),), logits_loss, target=_classes(seed=14), microbatch_reference=True,
        about="HF EfficientNet (BatchNorm, squeeze-excite)",
    )


# -- hand-written ----------------------------------------------------------------
def dropout() -> ZooCase:
    """BERT with its default dropout (0.1): eval must switch it off; the gradients are
    checked on the same weights with dropout 0."""

    def config(p: float) -> Any:
        return transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=NUM_CLASSES,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p,
        )

    return ZooCase(
        "dropout", _seeded(lambda: transformers.BertForSequenceClassification(config(0.1))),
        (_tokens(BATCH, SEQ, seed=15),), logits_loss, target=_classes(seed=16),
        grad_build=_seeded(lambda: transformers.BertForSequenceClassification(config(0.0))),
        about="HF BERT with dropout 0.1",
    )


def _load_example(name: str) -> Any:
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pipec_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet() -> ZooCase:
    UNet = _load_example("unet").UNet
    target = torch.randint(0, 2, (BATCH, IMAGE, IMAGE), generator=torch.Generator().manual_seed(17))
    return ZooCase(
        "unet", _seeded(lambda: UNet(channels=4, depth=2)), (_images(seed=18),), F.cross_entropy,
        target=target, about="examples/unet.py, long skip connections",
    )


class TiedLM(nn.Module):
    """Embedding and LM head share one weight, used at the first and the last stage."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(2)
        ])
        self.head = nn.Linear(dim, VOCAB, bias=False)
        nn.init.normal_(self.embed.weight, std=0.05)  # logits of a sane size through the tied head
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def tied() -> ZooCase:
    tokens = _tokens(BATCH, SEQ + 1, seed=19)
    return ZooCase("tied", _seeded(TiedLM), (tokens[:, :-1],), lm_loss, target=tokens[:, 1:],
                   about="embedding tied to the LM head")


class BatchSizeModel(nn.Module):
    """Every shape in ``forward`` is read from ``x.size(0)``: a trace that fixed the
    batch size, or ran on the full batch, would break on a micro-batch."""

    def __init__(self, dim: int = 32, tokens: int = 4) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(dim, tokens * dim)
        self.mix = nn.Linear(dim, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.view(x.size(0), -1)).view(x.size(0), self.tokens, -1)
        h = torch.cat([self.cls.expand(x.size(0), -1, -1), h], dim=1)
        h = h + torch.arange(h.size(1), dtype=h.dtype).view(1, -1, 1).expand(x.size(0), -1, h.size(2))
        h = torch.relu(self.mix(h.reshape(x.size(0) * h.size(1), -1))).reshape(x.size(0), -1, h.size(2))
        scale = torch.ones(x.size(0), 1, device=x.device) / h.size(1)
        return self.head(h.sum(dim=1) * scale)


def batch_size() -> ZooCase:
    x = torch.randn(BATCH, 4, 8, generator=torch.Generator().manual_seed(20))
    return ZooCase("size0", _seeded(BatchSizeModel), (x,), logits_loss, target=_classes(seed=21),
                   about="forward reads x.size(0) for every shape")


CASES: dict[str, Callable[[], ZooCase]] = {
    "gpt2": gpt2,
    "bert": bert,
    "t5": t5,
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "vit": vit,
    "efficientnet": efficientnet,
    "dropout": dropout,
    "unet": unet,
    "tied": tied,
    "size0": batch_size,
}
