"""partition says when a mean loss_fn does not survive micro-batching (issue #13).

Regression: ``F.cross_entropy(..., ignore_index=-100)`` (a token mean) with
padding spread unevenly over the batch averages each micro-batch over its own
token count, so the pipeline's loss and gradients differ from the full
batch's (by up to 0.48 relative) -- silently. partition now compares, on the
example batch, the full batch's loss with the mean of the micro-batch losses
and warns when they differ, pointing to ``(loss_sum, count)``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pipec


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.hidden = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.hidden(self.embed(ids)))))


def token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def token_sum_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (8, 6), generator=gen)
    labels = ids.clone()
    if padded:  # the first micro-batch is mostly padding, the others are not
        labels[:2, 1:] = -100
        labels[2, 4:] = -100
    return ids, labels


def _caught(loss_fn: object, padded: bool, cost_model: str = "h100-sxm") -> list[str]:
    torch.manual_seed(0)
    ids, labels = _batch(padded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipec.partition(TinyLM(), (ids,), num_stages=2, num_microbatches=4, loss_fn=loss_fn, target=labels,
                        cost_model=cost_model)
    return [str(w.message) for w in caught if "micro-batches" in str(w.message) and "loss" in str(w.message)]


@pytest.mark.parametrize("cost_model", ["h100-sxm", "profile"])
def test_a_token_mean_with_uneven_padding_warns(cost_model: str) -> None:
    (message,) = _caught(token_mean, padded=True, cost_model=cost_model)
    assert "not a mean over equal micro-batches" in message and "(loss_sum, count)" in message


def test_a_token_mean_without_padding_does_not_warn() -> None:
    assert _caught(token_mean, padded=False) == []


def test_a_sum_count_loss_does_not_warn() -> None:
    assert _caught(token_sum_count, padded=True) == []


def test_the_check_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchNorm warning
        pipec.partition(model, (x,), num_stages=2, num_microbatches=4, loss_fn=F.mse_loss, target=y,
                        cost_model="h100-sxm")
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def output_loss(output: object) -> torch.Tensor:
    return output.loss  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("padded", [True, False])
def test_a_hf_model_loss_with_padded_labels_warns(padded: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if padded:
        labels[:2, 2:] = -100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipec.partition(model, (ids,), example_kwargs={"labels": labels}, num_stages=2, num_microbatches=4,
                        loss_fn=output_loss, cost_model="h100-sxm")
    found = [w for w in caught if "not a mean over equal micro-batches" in str(w.message)]
    assert len(found) == (1 if padded else 0)
