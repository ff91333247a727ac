"""GPT-2 built from a transformers config (random weights, no download).

As a factory for the CLI::

    pipec partition examples/gpt2.py:make --stages 2 -o out/gpt2

or run this file to call ``pipec.partition()`` directly. The size can be
changed through environment variables (``GPT2_LAYERS``, ``GPT2_DIM``,
``GPT2_VOCAB``, ``GPT2_SEQ``, ``GPT2_BATCH``): a large vocabulary makes the
tied LM head heavy, which is where an automatic split beats equal blocks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch.nn import functional as F


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the model's logits."""
    logits = output["logits"]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def make() -> dict[str, Any]:
    layers = int(os.environ.get("GPT2_LAYERS", 4))
    dim = int(os.environ.get("GPT2_DIM", 128))
    vocab = int(os.environ.get("GPT2_VOCAB", 8192))
    seq = int(os.environ.get("GPT2_SEQ", 64))
    batch = int(os.environ.get("GPT2_BATCH", 8))
    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=dim,
        n_head=max(1, dim // 32),
        vocab_size=vocab,
        n_positions=seq,
        use_cache=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    return {
        "model": model,
        "example_inputs": (tokens[:, :-1],),
        "loss_fn": lm_loss,
        "target": tokens[:, 1:],
    }


if __name__ == "__main__":
    import pipec

    made = make()
    plan = pipec.partition(
        made["model"], made["example_inputs"], num_stages=2, num_microbatches=4,
        schedule="1f1b", loss_fn=made["loss_fn"],
    )
    print(plan.summary())
    sim = plan.simulate()
    print(f"simulated step time {sim.step_time * 1e3:.1f} ms, bubble {sim.bubble_fraction:.1%}")
