"""The profiler prices a ``loss_fn`` returning ``(loss_sum, count)`` like a mean loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pipec


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4096))


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nn.functional.cross_entropy(out, y, ignore_index=-100, reduction="sum"), (y != -100).sum()


def _three(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (*_ce_sum(out, y), 0)


def test_a_sum_and_count_loss_is_profiled() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 4096, (64,))
    y[::3] = -100
    traced = pipec.trace(_model(), (x,), method="fx")
    prof = pipec.profile(traced, repeats=2, warmup=0, progress=False, loss_fn=_ce_sum, target=y)
    assert prof.loss is not None
    assert prof.loss.forward_time > 0 and prof.loss.input_grad_time > 0
    assert prof.loss.saved_bytes >= 64 * 4096 * 4  # cross-entropy keeps its softmax for backward


def test_a_loss_of_another_shape_is_left_out_naming_what_it_returned(caplog: pytest.LogCaptureFixture) -> None:
    x, y = torch.randn(8, 64), torch.randint(0, 4096, (8,))
    traced = pipec.trace(_model(), (x,), method="fx")
    with caplog.at_level("WARNING", logger="pipec.profiling"):
        prof = pipec.profile(traced, repeats=1, warmup=0, progress=False, loss_fn=_three, target=y)
    assert prof.loss is None
    assert "a tuple of 3" in caplog.text and "(loss_sum, count)" in caplog.text
