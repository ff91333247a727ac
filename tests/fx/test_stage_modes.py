"""Stage modules follow train()/eval() as the original model does (issue #13).

The traced graph bakes the mode in as constants (``aten.dropout(x, p, True)``,
``batch_norm(..., training=True)``, ``num_batches_tracked.add_(1)``); the
stages read ``self.training`` instead, in memory and in saved stage files. The
stages are composed in one process, micro-batch by micro-batch, as the
runtime's executor runs them.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_split_models import manual_plan, tensors_of
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.facade import Plan


class DropBN(nn.Module):
    """Linear, BatchNorm, ReLU, Dropout module and a functional dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.l1(x))))
        h = F.dropout(h, 0.2, training=self.training)
        return self.l2(h)


def chain(stages: list[nn.Module], plan: Plan, flat: tuple[Any, ...]) -> Any:
    values = dict(zip((i.name for i in plan.data.inputs), flat))
    for stage in stages:
        result = stage(*[values[n] for n in stage.input_names])
        values.update(zip(stage.output_names, result))
    return result[-1]


def buffers(stages: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for s in stages for k, v in s.named_buffers()}


def _plan(model: nn.Module, x: torch.Tensor, method: str, num_stages: int = 2) -> tuple[Plan, list[nn.Module]]:
    plan = manual_plan(pipec.trace(model, (x,), method=method), num_stages)
    return plan, [plan.stage_module(k) for k in range(num_stages)]


def check_modes(stages: list[nn.Module], plan: Plan, ref: nn.Module, flat: tuple[Any, ...]) -> None:
    """eval(): the model's eval output exactly, buffers untouched; train() again: the
    model's train output (same global seed) and the same buffer updates."""
    before = buffers(stages)
    for s in stages:
        s.eval()
    ref.eval()
    with torch.no_grad():
        got, want = chain(stages, plan, flat), ref(*flat)
    for g, w in zip(tensors_of(got), tensors_of(want), strict=True):
        assert torch.equal(g, w)
    after = buffers(stages)
    assert all(torch.equal(before[k], after[k]) for k in before), "eval() updated buffers"
    for s in stages:
        s.train()
    ref.train()
    with torch.no_grad():
        torch.manual_seed(5)
        got = chain(stages, plan, flat)
        torch.manual_seed(5)
        want = ref(*flat)
    for g, w in zip(tensors_of(got), tensors_of(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    ref_buffers = dict(ref.named_buffers())
    for k, v in buffers(stages).items():
        assert torch.equal(v, ref_buffers[k]), f"buffer {k} differs after a train() forward"
    if any(k.endswith("running_mean") for k in before):
        assert any(not torch.equal(before[k], v) for k, v in buffers(stages).items()), "train() updated no buffer"


@pytest.mark.parametrize("method", ["fx", "export"])
def test_stages_follow_train_and_eval(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = DropBN(), torch.randn(8, 8)
    plan, stages = _plan(model, x, method)
    check_modes(stages, plan, copy.deepcopy(model), (x,))
    # through a saved plan: stage files read self.training too
    model_now = copy.deepcopy(model)
    model_now.load_state_dict(pipec.merge_state_dicts((s.state_dict() for s in stages), plan=plan))
    loaded = pipec.load(plan.save(tmp_path / "plan"))
    assert "self.training" in (tmp_path / "plan" / "stage_0.py").read_text()
    check_modes([loaded.stage_module(k) for k in range(2)], loaded, model_now, (x,))


def test_fx_stages_are_built_in_the_modes_the_model_was_traced_in() -> None:
    """fx leaf modules are traced through when a stage is built; the model's mode may
    have changed since partition (here: eval() to compute a reference)."""
    torch.manual_seed(0)
    model, x = DropBN(), torch.randn(8, 8)
    traced = pipec.trace(model, (x,), method="fx")
    model.eval()
    plan = manual_plan(traced, 2)
    stages = [plan.stage_module(k) for k in range(2)]
    assert not model.bn.training, "building the stages changed the model's mode"
    assert all(s.training for s in stages)
    check_modes(stages, plan, copy.deepcopy(model), (x,))


def test_eval_forward_is_the_models_not_off_by_batch_statistics() -> None:
    """The reported bug: after eval(), BatchNorm kept batch statistics (output off by 1.45)."""
    torch.manual_seed(0)
    model, x = DropBN(), torch.randn(8, 8)
    plan, stages = _plan(model, x, "export")
    ref = copy.deepcopy(model).eval()
    for s in stages:
        s.eval()
    assert torch.equal(chain(stages, plan, (x,)), ref(x))


def test_frozen_batch_norm_stays_frozen_in_train() -> None:
    torch.manual_seed(0)
    model, x = DropBN(), torch.randn(8, 8)
    model.drop.p = 0.0
    model.bn.eval()  # fine-tuning with frozen statistics
    plan, stages = _plan(model, x, "export")
    ref = copy.deepcopy(model)
    for s in stages:
        s.train()
    torch.manual_seed(1)
    got = chain(stages, plan, (x,))
    torch.manual_seed(1)
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-6)
    counter = dict(stages[0].named_buffers()).get("bn.num_batches_tracked")
    assert counter is None or int(counter) == 0


def test_plan_traced_in_eval_starts_in_eval_and_warns_when_trained() -> None:
    torch.manual_seed(0)
    model, x = DropBN().eval(), torch.randn(8, 8)
    plan, stages = _plan(model, x, "export")
    assert not any(s.training for s in stages)
    assert torch.equal(chain(stages, plan, (x,)), model(x))
    with pytest.warns(UserWarning, match="traced from a model in eval"):
        stages[0].train()
    # trained, its batch norm counts batches like the model's
    stages[0](x)
    assert int(stages[0].get_buffer("bn.num_batches_tracked")) == 1


def _hf(name: str) -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                           depths=[1, 1], layer_type="basic", num_labels=3)
        model = transformers.ResNetForImageClassification(config)
        return model, torch.randn(4, 3, 32, 32)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_labels=3)
    return transformers.ViTForImageClassification(config), torch.randn(4, 3, 16, 16)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_hf_models_follow_train_and_eval(name: str) -> None:
    model, x = _hf(name)
    model.train()
    plan, stages = _plan(model, x, "export", num_stages=3)
    reads = [n for s in stages for n in s.graph.nodes if n.op == "get_attr" and n.target == "training"]
    assert reads, "no stage reads the mode"
    check_modes(stages, plan, copy.deepcopy(model), (x,))


def test_batch_norm_warning_names_the_layers_and_summary_says_so() -> None:
    torch.manual_seed(0)
    model, x = DropBN(), torch.randn(8, 8)
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\) \(bn\) normalise each of the 4 micro-batches"):
        plan = pipec.partition(model, (x,), num_stages=2, num_microbatches=4, cost_model="cpu")
    assert "batch norm per micro-batch (bn)" in plan.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = pipec.partition(model, (x,), num_stages=2, num_microbatches=1, cost_model="cpu")
    assert "batch norm" not in single.summary()
