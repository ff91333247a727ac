"""A loaded plan binds a call's inputs exactly as the in-memory plan (issues #13, #14).

Regression: a loaded plan matched inputs by graph-input name, and export names
a dict argument's tensors ``batch_x``, ``batch_y``: ``pipec run``,
``PipelineRuntime(dir)`` and ``reference_step(dir, ...)`` failed at step 0 with
"missing input 'batch_y'". The plan data now holds the trace's input structure
(export's pytree spec, fx's parameters), and one function binds a call for
both kinds of plan (:func:`pipec.microbatch.flatten_call`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _one_rank import one_rank
from models import DictInput, dict_batch
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.errors import ConfigError
from pipec.microbatch import call_of
from pipec.runtime.runtime import PipelineRuntime


def test_a_loaded_plan_takes_a_dict_input_as_the_in_memory_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DictInput()
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))
    plan = pipec.partition(model, (dict_batch(0),), num_stages=2, num_microbatches=2,
                           loss_fn=F.cross_entropy, target=y, cost_model="h100-sxm")
    d = plan.save(tmp_path / "plan")
    batch = dict_batch(1)
    want = pipec.reference_step(plan, batch, target=y, loss_fn=F.cross_entropy)
    got = pipec.reference_step(d, batch, target=y, loss_fn=F.cross_entropy)
    torch.testing.assert_close(got.loss, want.loss)
    for name, grad in want.grads.items():
        torch.testing.assert_close(got.grads[name], grad, msg=name)
    # dict entries are matched by key, whatever their order
    swapped = {"y": batch["y"], "x": batch["x"]}
    assert pipec.load(d).flatten_inputs((swapped,)) == plan.flatten_inputs((batch,))
    pipe = PipelineRuntime(one_rank(pipec.load(d)), loss_fn=F.cross_entropy)
    loss = pipe.step(swapped, target=y)
    assert loss is not None
    torch.testing.assert_close(loss, want.loss)
    for loaded in (plan, pipec.load(d)):
        values = loaded.flatten_inputs((batch,))
        args, kwargs = call_of(values, loaded.data.input_structure, loaded.data.inputs)
        assert args == ({"x": batch["x"], "y": batch["y"]},) and kwargs == {}
        with pytest.raises(ConfigError, match="different structure"):
            loaded.flatten_inputs(({"x": batch["x"]},))
        with pytest.raises(ConfigError, match="different structure"):
            loaded.flatten_inputs((batch["x"], batch["y"]))


def test_a_plan_json_without_the_structure_still_binds_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    d = pipec.partition(model, (x,), num_stages=2, cost_model="h100-sxm").save(tmp_path / "plan")
    path = d / "plan.json"
    data = json.loads(path.read_text())
    assert data.pop("input_structure") is not None
    path.write_text(json.dumps(data))
    old = pipec.load(d, verify=False)
    assert old.data.input_structure is None
    (value,) = old.flatten_inputs((x,))
    assert value is x


def test_hf_keyword_inputs_bind_the_same_after_save_and_load(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    plan = pipec.partition(model, (ids,), example_kwargs={"attention_mask": mask, "labels": ids},
                           num_stages=2, num_microbatches=2, cost_model="h100-sxm")
    loaded = pipec.load(plan.save(tmp_path / "plan"))
    assert loaded.data.input_structure == plan.data.input_structure is not None
    ids2 = torch.randint(0, 64, (4, 8))
    calls = [((ids2,), {"attention_mask": mask, "labels": ids2}),
             ((ids2,), {"labels": ids2, "attention_mask": mask})]
    want = plan.flatten_inputs(*calls[0])
    assert len(want) == len(plan.data.inputs)
    for args, kwargs in calls:
        for p in (plan, loaded):
            got = p.flatten_inputs(args, kwargs)
            assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
    for p in (plan, loaded):
        with pytest.raises(ConfigError):
            p.flatten_inputs((ids2,), {"attention_mask": mask})  # labels were traced: pass them
    # and the loaded plan's stages compute what the in-memory plan's do on a keyword call
    want_step = pipec.reference_step(plan, ids2, loss_fn=output_loss, labels=ids2, attention_mask=mask)
    got_step = pipec.reference_step(tmp_path / "plan", ids2, loss_fn=output_loss, attention_mask=mask, labels=ids2)
    torch.testing.assert_close(got_step.loss, want_step.loss)
    for name, grad in want_step.grads.items():
        torch.testing.assert_close(got_step.grads[name], grad, msg=name)


def output_loss(output: object) -> torch.Tensor:
    return output["loss"]  # type: ignore[index,no-any-return]


class KeywordModel(nn.Module):
    """An HF-style forward for fx: a keyword tensor, a flag baked in, ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs: object) -> object:
        y = self.b(torch.relu(self.a(x)) * mask) + labels
        return {"y": y} if return_dict else (y,)


def test_fx_keyword_inputs_and_baked_flags_bind_the_same_after_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, labels, mask = torch.randn(4, 4), torch.randn(4, 4), torch.ones(4, 4)
    plan = pipec.partition(KeywordModel(), (x,), example_kwargs={"mask": mask, "labels": labels, "return_dict": False},
                           num_stages=2, num_microbatches=2, cost_model="h100-sxm", method="fx")
    loaded = pipec.load(plan.save(tmp_path / "plan"))
    assert loaded.data.input_structure == plan.data.input_structure is not None
    want = plan.flatten_inputs((x,), {"mask": mask, "labels": labels, "return_dict": False})
    assert [id(v) for v in want] == [id(v) for v in (x, labels, mask)]  # forward's order
    for p in (plan, loaded):
        for args, kwargs in [((x, labels), {"return_dict": False, "mask": mask}),
                             ((), {"return_dict": False, "mask": mask, "x": x, "labels": labels}),
                             ((x, labels, mask, False), {"extra": 1})]:  # **kwargs takes any keyword
            got = p.flatten_inputs(args, kwargs)
            assert [id(v) for v in got] == [id(v) for v in want]
        with pytest.raises(ConfigError, match="'return_dict' was traced with the value False"):
            p.flatten_inputs((x,), {"mask": mask, "labels": labels})  # the default (True) is not what was traced
        with pytest.raises(ConfigError, match="'return_dict' was traced with the value False"):
            p.flatten_inputs((x,), {"mask": mask, "labels": labels, "return_dict": True})
        with pytest.raises(ConfigError, match="missing input 'mask'"):
            p.flatten_inputs((x,), {"labels": labels, "return_dict": False})
        args, kwargs = call_of(want, p.data.input_structure, p.data.inputs)
        assert [id(v) for v in p.flatten_inputs(args, kwargs)] == [id(v) for v in want]


FACTORY = """
import torch
from torch import nn


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, batch):
        return self.out(torch.relu(self.a(batch["x"])) * torch.sigmoid(self.b(batch["y"])))


def make():
    torch.manual_seed(0)
    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 4)}
    return dict(model=DictInput(), example_inputs=(batch,), loss_fn=nn.functional.cross_entropy,
                target=torch.randint(0, 3, (4,)))
"""


def _pipec(cwd: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([sys.executable, "-m", "pipec", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=240)
    assert ran.returncode == 0, f"{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    return ran.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("factory", [True, False])
def test_pipec_run_trains_a_dict_input_plan(factory: bool, tmp_path: Path) -> None:
    """``pipec run`` calls the plan with the dict its model takes: the factory's batch, or
    (a plan saved from Python, no factory) a random batch built from plan.json."""
    if factory:
        (tmp_path / "factory.py").write_text(FACTORY)
        _pipec(tmp_path, "partition", "factory.py:make", "--stages", "2", "--microbatches", "2",
               "--cost-model", "h100-sxm", "-o", "plan")
    else:
        torch.manual_seed(0)
        plan = pipec.partition(DictInput(), (dict_batch(0),), num_stages=2, num_microbatches=2, cost_model="h100-sxm")
        plan.save(tmp_path / "plan")
    ran = _pipec(tmp_path, "run", "plan", "--nproc", "2", "--steps", "1")
    assert re.search(r"step 0: loss [-+0-9.e]+", ran), ran
