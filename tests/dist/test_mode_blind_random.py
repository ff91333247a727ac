"""Random operations that do not follow train/eval are named, not silently kept (issue #13).

Stochastic depth (timm ``DropPath``, torchvision ``StochasticDepth``) skips its
``torch.rand`` in Python when ``not self.training``; a model traced in
training mode keeps the draw in its graph, with no mode argument pipec could
switch. Partition names those nodes once, and ``pipe.eval()`` /
``stage.eval()`` warn, so a random eval output is never a surprise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _one_rank import one_rank
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.runtime.runtime import PipelineRuntime


class DropPath(nn.Module):
    """The issue's form: ``torch.rand`` (export only; fx cannot call it on a traced shape)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1) > self.p).to(x.dtype) / (1 - self.p)


class TimmDropPath(DropPath):
    """timm's ``drop_path``: ``new_empty(shape).bernoulli_(keep)``, a tensor method."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.p
        return x * x.new_empty((x.shape[0], 1)).bernoulli_(keep) / keep


class Net(nn.Module):
    def __init__(self, drop: type[nn.Module] = DropPath) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.dp = drop(0.5)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.dp(torch.relu(self.l1(x)))))


def _partition(model: nn.Module, x: torch.Tensor, method: str) -> tuple[pipec.Plan, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = pipec.partition(model, (x,), num_stages=2, loss_fn=F.mse_loss, target=torch.randn(8, 3),
                               method=method, cost_model="h100-sxm")
    return plan, [w for w in caught if "eval()" in str(w.message)]


@pytest.mark.parametrize(("method", "drop"), [("fx", TimmDropPath), ("export", TimmDropPath), ("export", DropPath)])
def test_stochastic_depth_traced_in_train_warns_at_partition_and_eval(
    method: str, drop: type[nn.Module], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, x = Net(drop), torch.randn(8, 8)
    plan, caught = _partition(model, x, method)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "(dp)" in str(caught[0].message) and "pipec.partition(model.eval()" in str(caught[0].message)
    assert list(plan.data.mode_blind_random.values()) == ["dp"]
    assert "random in eval() too" in plan.summary()

    for source in (plan, pipec.load(plan.save(tmp_path / "plan"))):
        pipe = PipelineRuntime(one_rank(source))
        with pytest.warns(UserWarning, match=r"still draws random numbers in eval\(\).*\(dp\)"):
            pipe.eval()
        # the warning is about a real difference: the eval output is not the model's
        assert not torch.allclose(pipe.forward(x), model.eval()(x))
        model.train()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_no_warning_where_every_random_node_follows_the_mode(method: str) -> None:
    torch.manual_seed(0)
    model, x = Net(nn.Dropout), torch.randn(8, 8)
    plan, caught = _partition(model, x, method)
    assert caught == [] and plan.data.mode_blind_random == {}
    pipe = PipelineRuntime(one_rank(plan))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.eval()
    torch.testing.assert_close(pipe.forward(x), model.eval()(x))


def test_model_partitioned_in_eval_runs_eval_exactly() -> None:
    """The advice the warning gives works: an eval-mode plan has no such node."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 8)
    plan, caught = _partition(model.eval(), x, "export")
    assert caught == [] and plan.data.mode_blind_random == {}
    pipe = PipelineRuntime(one_rank(plan))
    torch.testing.assert_close(pipe.forward(x), model(x))


class Noisy(nn.Module):
    """Samples in both modes (noise injection): its eval output is random on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        return self.l2(h + torch.randn_like(h))


def test_no_warning_for_a_model_that_draws_in_eval_too() -> None:
    torch.manual_seed(0)
    model, x = Noisy(), torch.randn(8, 8)
    plan, caught = _partition(model, x, "export")
    assert caught == [] and plan.data.mode_blind_random == {}
    pipe = PipelineRuntime(one_rank(plan))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.eval()
    assert model.training  # the check ran the model in eval mode and put it back
