"""pipec.partition leaves the user's model exactly as it found it (issue #13).

Regression: tracing and profiling ran the model in train mode, so batch-norm
running statistics moved (``running_var`` 1.0 -> 0.125, ``num_batches_tracked``
66 on a ResNet) and the plan saved the moved buffers. Now the model comes out
bit-identical -- parameters, buffers, RNG state, every submodule's ``training``
flag, ``requires_grad``, ``.grad`` -- and the plan holds the original values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pipec

transformers = pytest.importorskip("transformers")


class ConvBNDropout(nn.Module):
    """fx-traceable: batch norm (running statistics) and dropout (RNG) in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.drop(torch.relu(self.bn2(self.conv2(h))))
        return self.head(h.mean(dim=(2, 3)))


def _hf_resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


def _gpt2_dropout() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False,
                                  resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
    return transformers.GPT2LMHeadModel(cfg)


def _image() -> tuple[torch.Tensor, ...]:
    return (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


def _tokens() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1)),)


def _prepare(model: nn.Module) -> nn.Module:
    """Train mode with a twist (one submodule in eval), a frozen parameter, and .grad set
    on some parameters: every one of these must survive."""
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for i, p in enumerate(params[1:4]):
        p.grad = torch.full_like(p, float(i + 1))
    modules = [m for m in model.modules() if m is not model]
    modules[len(modules) // 2].eval()
    # buffers with a history: not the fresh 0/1 a new batch norm has
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: (None if p.grad is None else (id(p.grad), p.grad.clone())) for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def _assert_same(before: dict[str, Any], model: nn.Module) -> None:
    after = _state(model)
    assert after["ids"] == before["ids"]  # the same tensor objects, not copies
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for k, g in before["grad"].items():
        got = after["grad"][k]
        assert (got is None) == (g is None), k
        if g is not None:
            assert got[0] == g[0] and torch.equal(got[1], g[1]), k
    assert torch.equal(after["rng"], before["rng"])
    if before["cuda_rng"] is not None:
        assert all(torch.equal(a, b) for a, b in zip(after["cuda_rng"], before["cuda_rng"], strict=True))


def _assert_plan_holds(plan: pipec.Plan, before: dict[str, Any], directory: Path) -> None:
    originals = before["tensors"]
    seen = set()
    for k in range(plan.num_stages):
        for key, value in plan.stage_module(k).state_dict().items():
            assert torch.equal(value, originals[key]), f"stage {k} holds a changed {key}"
            seen.add(key)
    statistics = {k for k in originals if k.endswith("running_var")}
    assert not statistics or statistics & seen  # the plan holds batch-norm statistics, when there are any
    saved = plan.save(directory)
    for k in range(plan.num_stages):
        for key, value in load_file(str(saved / f"stage_{k}.safetensors")).items():
            assert torch.equal(value, originals[key]), f"stage_{k}.safetensors holds a changed {key}"


CASES = [
    pytest.param(ConvBNDropout, _image, "fx", id="batchnorm-dropout-fx"),
    pytest.param(ConvBNDropout, _image, "export", id="batchnorm-dropout-export"),
    pytest.param(_hf_resnet, _image, "auto", id="hf-resnet-auto"),
    pytest.param(_gpt2_dropout, _tokens, "export", id="gpt2-dropout-export"),
]


@pytest.mark.parametrize(("make", "inputs", "method"), CASES)
def test_partition_leaves_the_model_and_the_rng_untouched(make: Any, inputs: Any, method: str,
                                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _prepare(make())
    before = _state(model)
    plan = pipec.partition(model, inputs(), num_stages=2, num_microbatches=2, method=method)
    assert plan.data.cost_model.startswith("profile")
    _assert_same(before, model)
    _assert_plan_holds(plan, before, tmp_path)


def test_auto_search_profiles_without_touching_the_model(tmp_path: Path) -> None:
    # schedule / num_microbatches "auto" trace and profile once per micro-batch size
    torch.manual_seed(0)
    model = _prepare(ConvBNDropout())
    before = _state(model)
    plan = pipec.partition(model, _image(), num_stages=2, num_microbatches="auto", schedule="auto", method="fx")
    assert len({c.num_microbatches for c in plan.data.candidates}) > 1
    _assert_same(before, model)
    _assert_plan_holds(plan, before, tmp_path)


def test_trace_and_profile_on_their_own_leave_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = _prepare(ConvBNDropout())
    before = _state(model)
    traced = pipec.trace(model, _image(), method="fx")
    _assert_same(before, model)
    pipec.profile(traced, repeats=1, warmup=0, progress=False)
    _assert_same(before, model)


def test_a_model_that_fails_to_trace_is_still_restored() -> None:
    class Fails(ConvBNDropout):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn1(self.conv1(x))
            if h.sum() > 0:  # data-dependent: neither fx nor export can capture it
                return self.head(h.mean(dim=(2, 3)))
            return self.head(h.amax(dim=(2, 3)))

    torch.manual_seed(0)
    model = _prepare(Fails())
    before = _state(model)
    with pytest.raises(pipec.PipecError):
        pipec.partition(model, _image(), num_stages=2, num_microbatches=2)
    _assert_same(before, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profiling_on_cuda_leaves_the_cpu_model_and_both_rngs_untouched() -> None:
    # profiling moves the graph (whose modules are the model's, with fx) to CUDA and back;
    # the buffers must come back as the same objects holding the same values
    torch.cuda.init()
    torch.manual_seed(0)
    model = _prepare(ConvBNDropout())
    before = _state(model)
    assert before["cuda_rng"] is not None
    traced = pipec.trace(model, _image(), method="fx")
    pipec.profile(traced, device="cuda", repeats=1, warmup=0, progress=False)
    _assert_same(before, model)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_a_forward_that_writes_its_parameters_is_reported() -> None:
    # parameters are not copied (that would double the memory): their writes cannot be undone
    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.calls = nn.Parameter(torch.zeros(()), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return self.lin(x)

    model = Counts()
    with pytest.warns(UserWarning, match=r"wrote its own parameters in place while pipec ran it \(calls\)"):
        pipec.trace(model, (torch.randn(2, 4),), method="fx")
    assert model.calls.item() > 0  # what the warning is about
