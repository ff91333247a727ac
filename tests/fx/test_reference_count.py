"""``pipec.reference_step`` with a ``(loss_sum, count)`` loss: the full batch's token mean."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import pipec


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 16))


def _token_sum(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"), (y != -100).sum()


def test_reference_step_with_a_count_loss_is_the_full_batch_token_mean() -> None:
    model = _model()
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    target = ids.clone()
    target[0, 1:] = -100  # micro-batch 0 holds 7 tokens, micro-batch 1 holds 12: uneven
    plan = pipec.partition(model, (ids,), num_stages=2, num_microbatches=2, cost_model="cpu")
    ref = pipec.reference_step(plan, ids, target=target, loss_fn=_token_sum)
    expected = F.cross_entropy(model(ids).flatten(0, 1), target.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(ref.loss, expected.detach())
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(ref.grads[name], p.grad, msg=name)
